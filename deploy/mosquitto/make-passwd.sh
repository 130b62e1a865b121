#!/bin/sh
# Write mosquitto's password file (and a private copy of the ACL) for the compose stack.
#
#   EDGEPROBE_MQTT_USERS="collector:secret1 fra1-a:secret2" make-passwd.sh OUT_DIR [ACL_FILE]
#
# EDGEPROBE_MQTT_USERS holds user:password pairs separated by spaces or newlines (so neither may
# contain whitespace, and a username no ':'). Passwords are hashed by mosquitto_passwd (-b: taken
# from the command line; this runs in a one-shot container, not on a shared host). The files get
# mode 0600 and, when run as root where a "mosquitto" user exists, that owner, as mosquitto 2.0.16+
# expects. The output replaces any previous file atomically.
set -eu

out_dir="${1:?usage: make-passwd.sh OUT_DIR [ACL_FILE]}"
acl="${2:-}"
: "${EDGEPROBE_MQTT_USERS:?set EDGEPROBE_MQTT_USERS to user:password pairs}"

umask 077
mkdir -p "$out_dir"
tmp="$out_dir/passwd.tmp.$$"
rm -f "$tmp"
: > "$tmp"
count=0
for pair in $EDGEPROBE_MQTT_USERS; do
    user="${pair%%:*}"
    pass="${pair#*:}"
    if [ -z "$user" ] || [ "$user" = "$pair" ] || [ -z "$pass" ]; then
        echo "make-passwd.sh: expected user:password, got an entry for '${user}' without one" >&2
        rm -f "$tmp"
        exit 2
    fi
    mosquitto_passwd -b "$tmp" "$user" "$pass"
    count=$((count + 1))
done
chmod 0600 "$tmp"
if [ -n "$acl" ]; then
    cp "$acl" "$out_dir/acl.tmp.$$"
    chmod 0600 "$out_dir/acl.tmp.$$"
fi
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$tmp"
    [ -z "$acl" ] || chown mosquitto:mosquitto "$out_dir/acl.tmp.$$"
fi
mv "$tmp" "$out_dir/passwd"
[ -z "$acl" ] || mv "$out_dir/acl.tmp.$$" "$out_dir/acl"
echo "make-passwd.sh: $count users written to $out_dir/passwd"
