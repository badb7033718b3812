#!/usr/bin/env bash
# Makes sure the real services the test suite talks to are here: Chromium (Debian package), Redis, PostgreSQL.
# Installs or starts what it can; what it cannot do it reports, and the tests then fail under CI=true.
set -u

say() { printf 'ensure-services: %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

if [ ! -x /usr/bin/chromium ]; then
  say "installing Debian's chromium (Playwright drives it; it cannot download its own browser here)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q chromium >/dev/null 2>&1 \
    || { as_root apt-get update -q >/dev/null 2>&1 && as_root apt-get install -y -q chromium >/dev/null 2>&1; } \
    || say "could not install chromium: browser tests will fail"
fi

if ! (command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1); then
  say "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 || say "could not start redis"
fi

if ! (command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432); then
  say "starting PostgreSQL on 127.0.0.1:5432"
  for version in $(ls /etc/postgresql 2>/dev/null); do
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1
  done
  for _ in $(seq 1 20); do pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && break; sleep 0.5; done
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || say "could not start PostgreSQL"
fi
exit 0
