#!/bin/sh
# The image's entrypoint: `downpour COMMAND ...` as an unprivileged user.
#
# It starts as root only to prepare what the command needs, then drops to a user:
#   - the owner of /runs when a user's folder is mounted there (a clone's ./runs), so the
#     metrics and the model the scheduler writes belong to whoever ran compose;
#   - else the image's user `downpour` (uid 10001); a /runs the engine created (owned by
#     root) is then opened to everyone (mode 1777), so the user can read and remove files;
#   - for `keys DIR`, the owner of DIR (or of its nearest existing parent), so the key
#     pairs belong to whoever owns the folder (a clone's ./deploy/keys), root included.
# /checkpoints (a named volume) is handed to the same user.
#
# Keys: the engine mounts secrets with the host file's owner and mode (compose v1) or as
# root (swarm), so the user may not read them. When $DOWNPOUR_KEYS names a folder, its key
# files are copied into $PRIVATE_KEYS (in /dev/shm: memory, never the container's disk),
# owned by the user, folder 0700, secrets 0600, and DOWNPOUR_KEYS is pointed there (keys
# given by --keys are left as they are). downpour runs as root only for `keys` into a
# folder that root owns; nothing else does.
#
# Links: a role (scheduler, server, worker) with DOWNPOUR_LINK set (LINK in compose and the
# stack) first has its eth0 shaped to that rate each way (deploy/shape-link.sh; it needs
# NET_ADMIN). A bad rate, or shaping that fails, ends the container at once with one line
# saying why. Unset or empty: no shaping. `train` is left alone (its --link is its own).
set -eu
case "${1:-}" in
    scheduler|server|worker) link=${DOWNPOUR_LINK:-} ;;
    *) link= ;;
esac
if [ "$(id -u)" != 0 ]; then
    if [ -n "$link" ]; then
        echo "downpour-entrypoint: LINK=$link: shaping eth0 needs the container to start as" \
             "root, but it runs as uid $(id -u): drop user: (docker run --user); downpour" \
             "itself runs unprivileged all the same" >&2
        exit 1
    fi
    exec downpour "$@"
fi
[ -z "$link" ] || downpour-shape-link "$link"
uid=10001
gid=10001
PRIVATE_KEYS=/dev/shm/downpour-keys
[ -d /dev/shm ] || PRIVATE_KEYS=/run/downpour-keys

if [ "${1:-}" = keys ] && [ $# -ge 2 ]; then
    eval "folder=\${$#}"                       # the last argument: the folder it writes
    while [ ! -d "$folder" ]; do folder=$(dirname -- "$folder"); done
    uid=$(stat -c %u "$folder")
    gid=$(stat -c %g "$folder")
else
    if [ -d /runs ]; then
        owner=$(stat -c %u /runs)
        if [ "$owner" != 0 ]; then
            uid=$owner
            gid=$(stat -c %g /runs)
        else
            chmod 1777 /runs
        fi
    fi
    if [ -d /checkpoints ]; then
        chown "$uid:$gid" /checkpoints
    fi
    if [ -n "${DOWNPOUR_KEYS:-}" ] && [ -d "$DOWNPOUR_KEYS" ]; then
        rm -rf "$PRIVATE_KEYS"                  # a restarted container's old copy
        install -d -o "$uid" -g "$gid" -m 0700 "$PRIVATE_KEYS"
        for file in "$DOWNPOUR_KEYS"/*.key "$DOWNPOUR_KEYS"/*.key_secret; do
            if [ -f "$file" ]; then
                case "$file" in *.key) mode=0644 ;; *) mode=0600 ;; esac
                install -o "$uid" -g "$gid" -m "$mode" "$file" "$PRIVATE_KEYS/"
            fi
        done
        export DOWNPOUR_KEYS="$PRIVATE_KEYS"
    fi
fi
export HOME=/home/downpour
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups downpour "$@"
