#!/usr/bin/env bash
# Walks an authorization-code + PKCE login through idp.mjs with curl only (cookie jar,
# no auto-redirects), redeems the code, refreshes once, and ends the IdP session.
# This is the recipe described in README.md, kept runnable so it stays true.
#
#   ISSUER=http://127.0.0.1:9000 tests/idp/curl-login.sh [login-name]
#
# Needs: curl, openssl, sed, grep. Uses the default client (tokengate) unless
# CLIENT_ID / CLIENT_SECRET / REDIRECT_URI / POST_LOGOUT_REDIRECT_URI are set.
set -euo pipefail

ISSUER=${ISSUER:-http://127.0.0.1:9000}
CLIENT_ID=${CLIENT_ID:-tokengate}
CLIENT_SECRET=${CLIENT_SECRET:-tokengate-demo-secret}
REDIRECT_URI=${REDIRECT_URI:-http://localhost:8080/oauth-callback}
POST_LOGOUT_REDIRECT_URI=${POST_LOGOUT_REDIRECT_URI:-http://localhost:8080/}
LOGIN=${1:-alice}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
jar=$work/jar

step() { printf '\n== %s\n' "$*" >&2; }
# curl that never follows redirects; prints headers+body to a file, echoes status
req() { local out=$1; shift; curl -sS -o "$out.body" -D "$out.head" -w '%{http_code}' -c "$jar" -b "$jar" "$@"; }
location() { sed -n 's/^[Ll]ocation: *//p' "$1.head" | tr -d '\r'; }
absolute() { case $1 in http*) printf %s "$1" ;; *) printf %s "$ISSUER$1" ;; esac; }
form_action() { grep -o '<form [^>]*action="[^"]*"' "$1.body" | head -1 | sed 's/.*action="//;s/"$//'; }
json_field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" "$2"; }
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

verifier=$(openssl rand 48 | b64url)
challenge=$(printf %s "$verifier" | openssl dgst -sha256 -binary | b64url)
state=st-$RANDOM$RANDOM
nonce=n-$RANDOM$RANDOM
enc() { printf %s "$1" | sed 's/%/%25/g;s/:/%3A/g;s/\//%2F/g;s/ /%20/g;s/?/%3F/g;s/&/%26/g;s/=/%3D/g'; }

authorize="$ISSUER/auth?client_id=$(enc "$CLIENT_ID")&response_type=code&redirect_uri=$(enc "$REDIRECT_URI")"
authorize+="&scope=$(enc 'openid profile email offline_access')&state=$state&nonce=$nonce"
authorize+="&code_challenge=$challenge&code_challenge_method=S256&prompt=consent"

step "1. GET authorize URL -> 303 to /interaction/UID (login)"
st=$(req "$work/r1" "$authorize"); loc=$(location "$work/r1"); echo "$st $loc" >&2
[ "$st" = 303 ]

step "2. GET $loc -> 200 login form"
st=$(req "$work/r2" "$(absolute "$loc")"); action=$(form_action "$work/r2"); echo "$st form action=$action" >&2
[ "$st" = 200 ]
grep -q 'name="prompt" value="login"' "$work/r2.body"

step "3. POST login form -> 303 to /auth/UID (resume)"
st=$(req "$work/r3" -X POST --data-urlencode prompt=login --data-urlencode "login=$LOGIN" \
  --data-urlencode password=any "$action"); loc=$(location "$work/r3"); echo "$st $loc" >&2
[ "$st" = 303 ]

step "4. GET resume -> 303 to /interaction/UID2 (consent)"
st=$(req "$work/r4" "$(absolute "$loc")"); loc=$(location "$work/r4"); echo "$st $loc" >&2
[ "$st" = 303 ]

step "5. GET $loc -> 200 consent form"
st=$(req "$work/r5" "$(absolute "$loc")"); action=$(form_action "$work/r5"); echo "$st form action=$action" >&2
[ "$st" = 200 ]
grep -q 'name="prompt" value="consent"' "$work/r5.body"

step "6. POST consent form -> 303 to /auth/UID2 (resume)"
st=$(req "$work/r6" -X POST --data-urlencode prompt=consent "$action"); loc=$(location "$work/r6"); echo "$st $loc" >&2
[ "$st" = 303 ]

step "7. GET resume -> 303 to redirect_uri?code&state&iss"
st=$(req "$work/r7" "$(absolute "$loc")"); loc=$(location "$work/r7"); echo "$st $loc" >&2
[ "$st" = 303 ]
case $loc in "$REDIRECT_URI?"*) ;; *) echo "unexpected redirect: $loc" >&2; exit 1 ;; esac
code=$(printf %s "$loc" | sed -n 's/.*[?&]code=\([^&]*\).*/\1/p')
got_state=$(printf %s "$loc" | sed -n 's/.*[?&]state=\([^&]*\).*/\1/p')
[ "$got_state" = "$state" ]

step "8. POST /token authorization_code"
curl -sS -u "$CLIENT_ID:$CLIENT_SECRET" -d grant_type=authorization_code -d "code=$code" \
  --data-urlencode "redirect_uri=$REDIRECT_URI" -d "code_verifier=$verifier" "$ISSUER/token" > "$work/t1"
cat "$work/t1" >&2; echo >&2
at=$(json_field access_token "$work/t1"); rt=$(json_field refresh_token "$work/t1"); idt=$(json_field id_token "$work/t1")
[ -n "$at" ] && [ -n "$rt" ] && [ -n "$idt" ]

step "9. GET /me (userinfo)"
curl -sS -H "Authorization: Bearer $at" "$ISSUER/me" >&2; echo >&2

step "10. POST /token refresh_token (rotation: new refresh_token)"
curl -sS -u "$CLIENT_ID:$CLIENT_SECRET" -d grant_type=refresh_token -d "refresh_token=$rt" "$ISSUER/token" > "$work/t2"
cat "$work/t2" >&2; echo >&2
rt2=$(json_field refresh_token "$work/t2")
[ -n "$rt2" ] && [ "$rt2" != "$rt" ]

step "11. GET end_session with id_token_hint -> 200 confirm page"
st=$(req "$work/r11" -G --data-urlencode "id_token_hint=$idt" \
  --data-urlencode "post_logout_redirect_uri=$POST_LOGOUT_REDIRECT_URI" -d state=bye "$ISSUER/session/end")
action=$(form_action "$work/r11")
xsrf=$(grep -o 'name="xsrf" value="[^"]*"' "$work/r11.body" | sed 's/.*value="//;s/"$//')
echo "$st form action=$action xsrf=$xsrf" >&2
[ "$st" = 200 ] && [ -n "$xsrf" ]

step "12. POST confirm (xsrf + logout=yes) -> 303 to post_logout_redirect_uri?state"
st=$(req "$work/r12" -X POST -d "xsrf=$xsrf" -d logout=yes "$action"); loc=$(location "$work/r12"); echo "$st $loc" >&2
[ "$st" = 303 ]

# the (rotated) token response on stdout for the caller
cat "$work/t2"; echo
