#!/bin/sh
# Hydra's "ssh" for tests/test_many_hosts.py: run a command "on a host", where a host is a
# network namespace on this machine.  Hydra calls it as an ssh client:
#     enter_host.sh [-x | -o option ...] HOST COMMAND...
# and MINIBN_NETNS_HOSTS maps each HOST (an address) to its namespace: "addr=netns addr=netns".
while [ $# -gt 0 ]; do
    case "$1" in
        -o|-p|-l|-i) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
host="$1"; shift
for pair in $MINIBN_NETNS_HOSTS; do
    if [ "${pair%%=*}" = "$host" ]; then
        exec ip netns exec "${pair#*=}" /bin/sh -c "$*"
    fi
done
echo "enter_host.sh: no network namespace for host '$host' in MINIBN_NETNS_HOSTS='$MINIBN_NETNS_HOSTS'" >&2
exit 2
