#!/usr/bin/env bash
# Installs the Debian packages the lab needs, only when something is missing and only as root.
# Idempotent and fast when everything is present. Non-root: prints what is missing and exits 0
# (the tests then skip, or fail under CI, with a reason naming the missing binary).
set -euo pipefail
declare -A pkg_for=(
  [wireguard-go]=wireguard-go [wg]=wireguard-tools [nft]=nftables [iperf3]=iperf3 [tcpdump]=tcpdump
  [conntrack]=conntrack [ip]=iproute2 [ping]=iputils-ping [curl]=curl [dig]=dnsutils [pgrep]=procps
  [cc]=gcc [make]=make [iptables]=iptables [ip6tables]=iptables [strace]=strace [openssl]=openssl
)
missing=()
for bin in "${!pkg_for[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${pkg_for[$bin]}")
done
# the native accelerator's build (hatch_build.py, docs/native.md): OpenSSL's headers, and Python's for a Debian python
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
py_include=$("${PYTHON:-python3}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
case "$py_include" in
  /usr/include/*) [ -f "$py_include/Python.h" ] || missing+=(python3-dev) ;;
esac
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "netsim: missing system packages (${missing[*]}); run as root to install them, lab tests will skip" >&2
  exit 0
fi
echo "netsim: installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
