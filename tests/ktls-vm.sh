#!/usr/bin/env bash
# Run the kTLS tests on a kernel that has the tls module, in a virtual machine, for machines whose
# own kernel lacks it (the tests skip there): Debian's kernel under qemu, booted from a small
# busybox initramfs that loads tls (and the AES-GCM modules it needs: nothing else would load
# them) and runs the tests in this machine's own file system, shared read-write over 9p. Needs
# root (apt-get), Python 3.12 or later for the venv (ssl.OP_ENABLE_KTLS), and no KVM: it uses
# qemu's emulator, so a run takes minutes and its timings mean nothing.
#
#   bash tests/ktls-vm.sh /path/to/python3.12 [pytest arguments]
#
# It makes .venv-ktls with that Python, and by default runs tests/test_sockettls.py,
# tests/test_ktls.py and the kTLS hit test of tests/test_cache.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:?usage: bash tests/ktls-vm.sh PYTHON3.12+ [pytest arguments]}
shift
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/test_sockettls.py tests/test_ktls.py
        "tests/test_cache.py::test_tls_hits_go_by_sendfile_where_the_kernel_encrypts")
fi
"$python" -c 'import ssl, sys; sys.exit(not hasattr(ssl, "OP_ENABLE_KTLS"))' || {
    echo "tests/ktls-vm.sh: $python has no ssl.OP_ENABLE_KTLS (Python 3.12 or later)" >&2
    exit 1
}

work=$(mktemp -d /tmp/hubproxy-ktls-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
export DEBIAN_FRONTEND=noninteractive
command -v qemu-system-x86_64 >/dev/null && [ -x /usr/bin/busybox ] ||
    apt-get install -y -qq --no-install-recommends qemu-system-x86 busybox-static >/dev/null
image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
(cd "$work" && apt-get download -qq "$image" 2>/dev/null && dpkg -x ./*.deb kernel)
release=$(ls "$work/kernel/lib/modules")
modules="$work/kernel/lib/modules/$release/kernel"

[ -x .venv-ktls/bin/python ] || "$python" -m venv .venv-ktls
.venv-ktls/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# the initramfs: busybox, the modules in load order, and an init that runs the tests
mkdir -p "$work/initrd/bin" "$work/initrd/mod"
cp /usr/bin/busybox "$work/initrd/bin/"
order=(drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/9p/9pnet
    net/9p/9pnet_virtio fs/netfs/netfs fs/fscache/fscache fs/9p/9p crypto/gf128mul
    crypto/ghash-generic crypto/ctr crypto/gcm crypto/cryptd crypto/crypto_simd crypto/seqiv
    arch/x86/crypto/aesni-intel arch/x86/crypto/ghash-clmulni-intel net/tls/tls)
names=()
for module in "${order[@]}"; do
    cp "$modules/$module.ko" "$work/initrd/mod/"
    names+=("$(basename "$module")")
done
cat >"$work/guest.sh" <<EOF
#!/bin/bash
export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
# the tests' files on the guest's own tmpfs: SQLite (the manifest store) cannot lock over 9p
mkdir -p $work/tmp
mount -t tmpfs tmp $work/tmp
export TMPDIR=$work/tmp
cd $PWD
echo "kernel \$(uname -r); TCP upper-layer protocols: \$(cat /proc/sys/net/ipv4/tcp_available_ulp)"
.venv-ktls/bin/python -m pytest -q -p no:cacheprovider -rs --basetemp=$work/tmp/pytest ${tests[*]@Q}
echo "ktls-vm: pytest exit \$?"
EOF
cat >"$work/initrd/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /host
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in ${names[*]}; do insmod /mod/\$module.ko || echo "insmod \$module failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host /host
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t devpts pts /host/dev/pts
ip link set lo up
chroot /host /bin/bash $work/guest.sh
poweroff -f
EOF
chmod +x "$work/initrd/init" "$work/guest.sh"
(cd "$work/initrd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 4096 -nographic -no-reboot \
    -kernel "$work/kernel/boot/vmlinuz-$release" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1" \
    -virtfs local,path=/,mount_tag=host,security_model=passthrough,id=host 2>/dev/null |
    tee "$work/console.log" | grep -v '^\[' | tr -d '\r'
grep -q "ktls-vm: pytest exit 0" "$work/console.log"
