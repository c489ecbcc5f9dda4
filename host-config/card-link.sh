#!/bin/sh
# The host side of the card link with nothing but iproute2 (or busybox ip):
# find the card's virtio_net interface by driver and MAC, set its MTU, give it
# the host's addresses and route via the card. Safe to run again.
# Usage: card-link.sh   (settings below; override them in the environment)
set -eu
CARD_MAC=${CARD_MAC:-52:54:00:12:34:56}  # the MAC QEMU gives the card's NIC
CARD_MTU=${CARD_MTU:-65520}              # what the card offers (VIRTIO_NET_F_MTU)
HOST4=${HOST4:-10.77.0.2/24}
HOST6=${HOST6:-fd77::2/64}
CARD4=${CARD4:-10.77.0.1}               # the card: the host's gateway
CARD6=${CARD6:-fd77::1}
ROUTES4=${ROUTES4:-default}             # e.g. "10.78.0.0/24 10.79.0.0/24" to keep another default route
ROUTES6=${ROUTES6:-default}

dev=
for d in /sys/class/net/*; do
    [ -e "$d/device/driver" ] || continue
    drv=$(basename "$(readlink "$d/device/driver")")
    # virtio_net binds the virtio device, a child of the PCI function.
    [ "$drv" = virtio_net ] || continue
    [ "$(cat "$d/address")" = "$CARD_MAC" ] || continue
    dev=$(basename "$d")
done
if [ -z "$dev" ]; then
    echo "card-link: no virtio_net interface with MAC $CARD_MAC" >&2
    exit 1
fi

[ -w /proc/sys/net/ipv6/conf/"$dev"/accept_dad ] && echo 0 > /proc/sys/net/ipv6/conf/"$dev"/accept_dad
ip link set dev "$dev" mtu "$CARD_MTU"
ip link set dev "$dev" up
ip -4 addr show dev "$dev" | grep -q " ${HOST4%/*}/" || ip addr add "$HOST4" dev "$dev"
ip -6 addr show dev "$dev" | grep -q " ${HOST6%/*}/" || ip addr add "$HOST6" dev "$dev"
for r in $ROUTES4; do ip route replace "$r" via "$CARD4" dev "$dev"; done
for r in $ROUTES6; do ip -6 route replace "$r" via "$CARD6" dev "$dev"; done
echo "card-link: $dev mtu $(cat /sys/class/net/"$dev"/mtu), $HOST4 $HOST6, routes $ROUTES4 via $CARD4, $ROUTES6 via $CARD6"
