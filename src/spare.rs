//! Read buffers and header maps kept per worker thread between requests.
//!
//! A keep-alive connection waiting for its next request holds no read buffer (as in nginx): most
//! browser connections are idle most of the time, and 2,000 idle connections cost 10.7 KB each
//! with an 8 KB buffer kept per connection, 4.7 KB without. A request takes a buffer only once
//! its bytes are there, and gives it back here when it is answered; the next request on this
//! thread takes it again instead of allocating one (an allocation, its free, and the shared
//! header `bytes` adds on the first `split_to`: ~1,200 instructions per API call, server and
//! upstream side together).
//!
//! A buffer may come back while parts of it are still in use (the answer's head is read from the
//! upstream connection's buffer, and its fields live until the answer is written): it is reused
//! only once nothing else refers to it ([`BytesMut::try_reclaim`]), so nothing is ever written
//! over bytes someone still reads. Kept: at most [`KEPT`] per thread, none larger than
//! [`LARGEST`] (a body read grows a buffer to 64 KB; those are freed).
//!
//! Header maps are kept the same way ([`map`], [`give_back_map`]): each API call builds two (the
//! request's and the answer's), each two allocations and two frees; a kept one is cleared and
//! filled again.

use std::cell::RefCell;
use std::collections::VecDeque;

use bytes::BytesMut;
use http::HeaderMap;

/// Buffers kept per thread: as many as requests in flight on it, up to this.
const KEPT: usize = 64;
/// A larger buffer is freed, not kept.
const LARGEST: usize = 16 * 1024;

/// Header maps kept per thread.
const KEPT_MAPS: usize = 64;
/// A map with room for more fields than this is freed, not kept.
const LARGEST_MAP: usize = 64;

thread_local! {
    static SPARE: RefCell<VecDeque<BytesMut>> = const { RefCell::new(VecDeque::new()) };
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `fields`: a kept one if there is one, a new one otherwise.
pub fn map(fields: usize) -> HeaderMap {
    let kept = MAPS.with(|maps| maps.try_borrow_mut().ok()?.pop());
    match kept {
        Some(mut m) => {
            // Kept maps are empty: room for `fields` more is room for `fields`.
            m.reserve(fields);
            m
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Gives back a header map no longer needed: its fields are dropped now, its memory kept for the
/// next [`map`] on this thread.
pub fn give_back_map(mut m: HeaderMap) {
    if m.capacity() == 0 || m.capacity() > LARGEST_MAP {
        return;
    }
    m.clear();
    MAPS.with(|maps| {
        if let Ok(mut maps) = maps.try_borrow_mut() {
            if maps.len() < KEPT_MAPS {
                maps.push(m);
            }
        }
    });
}

/// An empty buffer with room for at least `want` bytes: a kept one if one is free, a new one
/// otherwise. The oldest kept one is tried first (the most recent is the likeliest still in use);
/// one still in use is dropped (its memory is freed with its last user).
pub fn take(want: usize) -> BytesMut {
    let kept = SPARE.with(|spare| {
        let mut spare = spare.try_borrow_mut().ok()?;
        while let Some(mut buf) = spare.pop_front() {
            if buf.try_reclaim(want) {
                return Some(buf);
            }
        }
        None
    });
    kept.unwrap_or_else(|| BytesMut::with_capacity(want))
}

/// Gives back a buffer whose bytes are all used (taken out with `split_to` or unwanted).
pub fn give_back(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() == 0 || buf.capacity() > LARGEST {
        return;
    }
    SPARE.with(|spare| {
        if let Ok(mut spare) = spare.try_borrow_mut() {
            if spare.len() < KEPT {
                spare.push_back(buf);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again() {
        let mut buf = take(1024);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let ptr = buf.as_ptr();
        let head = buf.split_to(buf.len()).freeze();
        drop(head);
        give_back(buf);
        let again = take(1024);
        assert_eq!(again.as_ptr(), ptr, "the same memory, not a new allocation");
        assert!(again.is_empty() && again.capacity() >= 1024);
    }

    #[test]
    fn a_buffer_still_read_elsewhere_is_not_written_over() {
        let mut buf = take(1024);
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        let head = buf.split_to(buf.len()).freeze();
        give_back(buf);
        let mut next = take(1024);
        next.extend_from_slice(&[b'x'; 1024]);
        assert_eq!(&head[..], b"HTTP/1.1 200 OK\r\n\r\n");
        assert_ne!(next.as_ptr(), head.as_ptr());
    }

    #[test]
    fn a_map_given_back_comes_back_empty_and_large_ones_are_not_kept() {
        let mut m = map(8);
        m.insert(http::header::HOST, http::HeaderValue::from_static("a"));
        m.append("x-a", http::HeaderValue::from_static("1"));
        m.append("x-a", http::HeaderValue::from_static("2"));
        give_back_map(m);
        let again = map(4);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(again.keys_len(), 0);
        assert!(again.capacity() >= 8, "the kept map, not a new one");
        let bigger = map(40);
        assert!(bigger.capacity() >= 40);
        let mut huge = HeaderMap::with_capacity(LARGEST_MAP * 2);
        huge.insert(http::header::HOST, http::HeaderValue::from_static("b"));
        let before = MAPS.with(|m| m.borrow().len());
        give_back_map(huge);
        assert_eq!(MAPS.with(|m| m.borrow().len()), before);
        for _ in 0..KEPT_MAPS * 2 {
            give_back_map(HeaderMap::with_capacity(4));
        }
        assert_eq!(MAPS.with(|m| m.borrow().len()), KEPT_MAPS);
    }

    #[test]
    fn large_buffers_are_freed_and_the_count_is_bounded() {
        give_back(BytesMut::with_capacity(LARGEST * 2));
        for _ in 0..KEPT * 2 {
            give_back(BytesMut::with_capacity(1024));
        }
        let kept = SPARE.with(|s| {
            s.borrow()
                .iter()
                .map(BytesMut::capacity)
                .collect::<Vec<_>>()
        });
        assert_eq!(kept.len(), KEPT);
        assert!(kept.iter().all(|&c| c <= LARGEST));
    }
}
