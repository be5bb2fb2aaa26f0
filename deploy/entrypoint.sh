#!/bin/sh
# The image's entrypoint: `downpour ROLE ...` as an unprivileged user.
#
# It starts as root only to make the output folders usable, then drops to a user:
#   - the owner of /runs when a user's folder is mounted there (a clone's ./runs), so the
#     metrics and the model the scheduler writes belong to whoever ran compose;
#   - else the image's user `downpour` (uid 10001); a /runs the engine created (owned by
#     root) is then opened to everyone (mode 1777), so the user can read and remove files.
# /checkpoints (a named volume) is handed to the same user. Nothing else runs as root.
set -eu
if [ "$(id -u)" != 0 ]; then
    exec downpour "$@"
fi
uid=10001
gid=10001
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
export HOME=/home/downpour
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups downpour "$@"
