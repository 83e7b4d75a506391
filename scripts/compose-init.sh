#!/bin/sh
# The init service of compose.yaml (installed in the image as dlm-compose-init).
#
# Marks the stack's instances fresh (`dlm init --fresh`, rule E1) once in the life of its
# state volume, never again: a second `docker compose up`, a `docker compose restart` or a
# re-created redis container finds the marker and marks nothing, so an instance that
# restarted empty, perhaps after granting locks still held by someone, sits out its rejoin
# wait instead of granting at once. The marker is written *before* `dlm init`: an attempt
# that fails part-way is not retried by the next `up` (its instances then wait their rejoin
# delay, the safe side). `docker compose down -v` removes the marker with the volumes.
#
# Environment: DLM_REDIS (the instances), DLM_INIT_MARKER (default
# /var/lib/dlm-init/initialized, on a named volume). Arguments go to `dlm init --fresh`.
set -eu
marker="${DLM_INIT_MARKER:-/var/lib/dlm-init/initialized}"
if [ -e "$marker" ]; then
    echo "dlm-compose-init: this stack was initialized before ($marker exists):" \
         "no instance marked fresh; one that restarted since sits out its rejoin wait (E1, E2)"
    exit 0
fi
date -u +%Y-%m-%dT%H:%M:%SZ > "$marker"
dlm init --fresh --yes "$@"
