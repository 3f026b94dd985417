# Sets the host name from `hostname=` on the kernel command line (letters, digits, dots and
# dashes), else "nixos", as nix-community/nixos-images' netboot module does: one netboot image,
# a name per machine.
#
# Usage: hostname-from-cmdline CMDLINE_FILE HOSTNAME_FILE
# (at activation: /proc/cmdline and /proc/sys/kernel/hostname)

name=nixos
read -r cmdline <"$1" || true
set -f
for option in $cmdline; do
  case $option in
    hostname=?*) name=${option#hostname=} ;;
  esac
done
case $name in
  *[!A-Za-z0-9.-]*) name=nixos ;;
esac
printf '%s' "$name" >"$2"
