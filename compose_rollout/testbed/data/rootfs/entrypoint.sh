#!/bin/sh
# PID 1 of the test-bed app. busybox httpd as PID 1 would ignore SIGTERM (the
# kernel drops signals PID 1 has no handler for), so every `docker stop` and
# compose recreate would wait the full 10 s grace period. This wrapper traps
# TERM and stops httpd at once. It is deliberately not graceful: requests in
# flight when the container stops fail, so only a real drain avoids errors.
echo "${INSTANCE:-unknown}" > /www/instance
# Fault injection for tests: an instance whose environment names this image's version
# fails /health on that version only (so it can roll back to the previous one).
if [ -n "$UNHEALTHY_ON_VERSION" ] && [ "$UNHEALTHY_ON_VERSION" = "$(cat /www/version)" ]; then
  rm -f /www/health
fi
httpd -f -p 8080 -h /www &
httpd_pid=$!
trap 'kill -TERM "$httpd_pid" 2>/dev/null; exit 0' TERM INT
wait "$httpd_pid"
