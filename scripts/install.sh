#!/usr/bin/env bash
# Install, upgrade or remove the building safety gateway on a Raspberry Pi (Raspberry Pi OS Bookworm).
# Idempotent: re-running it upgrades the code and restarts the service; the site config is never
# overwritten. It never starts an unedited site: the service is started only once the site config passes
# `gatewayctl config check` and is no longer the shipped example. See docs/deploy.md.
set -euo pipefail

readonly DEFAULT_PREFIX=/opt/gateway
readonly UNIT=gatewayd.service
readonly UNIT_DEST=/etc/systemd/system/$UNIT
readonly SYSUSERS_DEST=/etc/sysusers.d/gateway.conf
readonly TMPFILES_DEST=/etc/tmpfiles.d/gateway.conf
readonly UDEV_DEST=/etc/udev/rules.d/99-gateway-rs485.rules
readonly UDEV_MODEM_DEST=/etc/udev/rules.d/99-gateway-modem.rules
readonly MODULES_DEST=/etc/modules-load.d/gateway-serial.conf
# systemd >= 254 backs off between restarts (RestartSteps=); older ones do not know the setting.
readonly BACKOFF_DEST=/etc/systemd/system/$UNIT.d/restart-backoff.conf
readonly CONFIG_DIR=/etc/gateway
readonly CONFIG=$CONFIG_DIR/building.toml
readonly DATA_DIR=/var/lib/gateway
readonly EXAMPLE=examples/building.toml
# gatewayd and gatewayctl are linked here so that `sudo gatewayctl doctor` works as docs/cli.md says.
readonly BIN_DIR=/usr/local/bin
readonly COMMANDS=(gatewayd gatewayctl)
# Every runtime dependency pinned (scripts/lock); pip installs nothing else.
readonly LOCK=constraints/runtime.txt
# Where pip looks when there is no --wheels; probed before anything changes.
readonly INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple/}
# apt packages that build lgpio from its pinned source where PyPI has no wheel for this Python and machine.
readonly LGPIO_BUILD_DEPS=(swig gcc libc6-dev python3-dev)
# apt packages that build python-gammu from its pinned source against Debian's libGammu where PyPI has no wheel.
readonly GAMMU_BUILD_DEPS=(libgammu-dev pkg-config gcc python3-dev)

PREFIX=$DEFAULT_PREFIX
PYTHON=python3
DRY_RUN=0
UNINSTALL=0
PURGE=0
WHEELS=""

usage() {
    cat <<EOF
Usage: sudo $0 [OPTIONS]

Install gatewayd as a systemd service: system user 'gateway', a virtualenv under PREFIX, the unit,
tmpfiles and udev rule, an example config at $CONFIG (only if none exists), gatewayd and
gatewayctl linked into $BIN_DIR; then enable the service. It is (re)started only when the site
config passes 'gatewayctl config check' and is not the shipped example unchanged; otherwise the
next steps are printed. Run again to upgrade.

Options:
  --prefix DIR   where the virtualenv and docs go (default $DEFAULT_PREFIX)
  --python EXE   Python >= 3.11 used to create the virtualenv (default python3)
  --wheels DIR   install offline, from the wheels in DIR only (scripts/wheelhouse makes them;
                 docs/deploy.md, "Offline install")
  --uninstall    stop and remove the service, unit, rules and virtualenv; keep data and config
  --purge        with --uninstall: also delete $DATA_DIR (event history, outbox), $CONFIG_DIR
                 and the 'gateway' user
  --dry-run      print each action as 'would: <command>' and change nothing (root not needed)
  -h, --help     show this help
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

# Every action that changes the system goes through run: printed, and executed unless --dry-run.
run() {
    if ((DRY_RUN)); then
        printf 'would:'
        printf ' %q' "$@"
        printf '\n'
    else
        printf '+'
        printf ' %q' "$@"
        printf '\n'
        "$@"
    fi
}

# Something deliberately left alone, said once so the operator knows.
keep() {
    printf 'keep: %s\n' "$*"
}

# udev reads the rules again (and with "trigger" applies them to the serial ports present). A system without
# udev (a container) has no device events to apply them to: the rules are installed and that is said.
reload_udev() {
    if ((!DRY_RUN)) && ! command -v udevadm >/dev/null; then
        keep "udev rules (no udevadm here: not reloaded)"
        return
    fi
    run udevadm control --reload
    if [[ ${1:-} == trigger ]]; then
        run udevadm trigger --subsystem-match=tty --action=add
    fi
}

# The serial driver whose device class the unit can only name (ttySC: no fixed major) must be loaded before it
# starts (systemd drops a class it does not know yet); at boot systemd-modules-load does it, now modprobe does.
load_serial_drivers() {
    local modules
    mapfile -t modules < <(grep -Ev '^[[:space:]]*(#|$)' systemd/gateway-serial.conf)
    if ((!DRY_RUN)) && ! command -v modprobe >/dev/null; then
        keep "serial drivers ${modules[*]} (no modprobe here: loaded at the next boot)"
        return
    fi
    if ! run modprobe -q -a "${modules[@]}"; then
        keep "serial drivers: not every one of ${modules[*]} loads on this kernel (those it has load at boot)"
    fi
}

# Backing off between restarts (1 s growing to 30 s) where systemd knows RestartSteps= (>= 254).
install_backoff() {
    local version
    version=$(systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 + 0 }')
    if ((${version:-0} >= 254)); then
        run install -D -m 0644 /dev/stdin "$BACKOFF_DEST" <<'EOF'
# Installed by scripts/install.sh on systemd >= 254: restarts back off from 1 s to 30 s (docs/deploy.md).
[Service]
RestartSteps=5
RestartMaxDelaySec=30s
EOF
    elif [[ -e $BACKOFF_DEST ]]; then
        run rm -f -- "$BACKOFF_DEST"
    fi
}

# Directories that `install -D` made for our files, once empty; never one that a package owns (on a Pi,
# /etc/udev/rules.d belongs to udev and stays).
remove_empty_dirs() {
    local dir
    for dir in "$@"; do
        if [[ -d $dir ]] && [[ -z $(ls -A -- "$dir") ]] && ! dpkg -S "$dir" >/dev/null 2>&1; then
            run rmdir -- "$dir"
        fi
    done
}

# What the operator does next, once the installer is done.
next_step() {
    printf 'next: %s\n' "$*"
}

parse_args() {
    while (($#)); do
        case $1 in
            --prefix)
                (($# >= 2)) || die "--prefix needs a directory"
                PREFIX=$2
                shift
                ;;
            --prefix=*) PREFIX=${1#--prefix=} ;;
            --python)
                (($# >= 2)) || die "--python needs an executable"
                PYTHON=$2
                shift
                ;;
            --python=*) PYTHON=${1#--python=} ;;
            --wheels)
                (($# >= 2)) || die "--wheels needs a directory"
                WHEELS=$2
                shift
                ;;
            --wheels=*) WHEELS=${1#--wheels=} ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1 ;;
            --dry-run) DRY_RUN=1 ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                usage >&2
                die "unknown option: $1"
                ;;
        esac
        shift
    done
    [[ $PREFIX == /* ]] || die "--prefix must be an absolute path, got '$PREFIX'"
    PREFIX=${PREFIX%/}
    [[ -n $PREFIX && $PREFIX != /usr && $PREFIX != /etc ]] || die "refusing --prefix '$PREFIX'"
    if ((PURGE && !UNINSTALL)); then
        die "--purge only goes with --uninstall"
    fi
    if [[ -n $WHEELS ]]; then
        [[ -d $WHEELS ]] || die "--wheels: no directory '$WHEELS'"
        WHEELS=$(cd -- "$WHEELS" && pwd)
    fi
}

# How lgpio (gpiozero's backend) gets here, decided from this machine and Python before anything changes:
# "wheel" where PyPI has one (aarch64, x86_64 and armv7l with CPython 3.11 and 3.12) or DIR of --wheels holds one,
# "build" from the pinned source elsewhere (CPython 3.13 on Trixie, armv6l boards). docs/deploy.md, "Targets".
# A platform the gateway cannot serve is refused here, in one line.
LGPIO_FROM=""
MACHINE=""
check_platform() {
    local machine pyver
    [[ $(uname -s) == Linux ]] || die "unsupported platform: $(uname -s) (the gateway runs on Linux, on a Raspberry Pi)"
    # the interpreter's, not the kernel's: 32-bit Raspberry Pi OS runs a 64-bit kernel on a Pi 4
    machine=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_platform().rsplit("-", 1)[-1])')
    pyver=$("$PYTHON" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    case $machine in
        aarch64 | x86_64 | armv7l)
            case $pyver in
                311 | 312) LGPIO_FROM=wheel ;;
                *) LGPIO_FROM=build ;;
            esac
            ;;
        armv6l) LGPIO_FROM=build ;;
        *) die "unsupported platform: $machine (the gateway runs on a Raspberry Pi: aarch64, armv7l or armv6l)" ;;
    esac
    MACHINE=$machine
    check_gammu "$pyver"
    if [[ $LGPIO_FROM == wheel ]] || [[ -n $(lgpio_wheel_in "$WHEELS" "$pyver" "$machine") ]]; then
        LGPIO_FROM=wheel
        return
    fi
    local missing=()
    command -v swig >/dev/null || missing+=(swig)
    command -v gcc >/dev/null || missing+=(gcc)
    python_headers || missing+=(python3-dev)
    if ((${#missing[@]})); then
        [[ -z $WHEELS ]] || die "lgpio must be built here ($machine, Python ${pyver:0:1}.${pyver:1}) and ${missing[*]} missing: apt install ${LGPIO_BUILD_DEPS[*]}, or put an lgpio wheel built on such a Pi in $WHEELS"
        LGPIO_FROM="build, after: apt-get install ${LGPIO_BUILD_DEPS[*]}"
    fi
}

# How python-gammu (the SMS modem) gets here: "wheel" where PyPI has one (aarch64 and x86_64, CPython 3.11-3.13;
# it bundles libGammu) or DIR of --wheels holds one; elsewhere (32-bit Pi OS: armv7l, armv6l) "build" from its pinned
# source against Debian's libGammu (libgammu-dev), rather than Debian's older python3-gammu. docs/deploy.md, "Targets".
GAMMU_FROM=""
check_gammu() {
    local pyver=$1
    case $MACHINE:$pyver in
        aarch64:31[123] | x86_64:31[123])
            GAMMU_FROM=wheel
            return
            ;;
    esac
    if [[ -n $WHEELS ]] && compgen -G "$WHEELS/python_gammu-*-cp$pyver-cp$pyver-*$MACHINE.whl" >/dev/null; then
        GAMMU_FROM=wheel
        return
    fi
    GAMMU_FROM=build
    local missing=()
    [[ -e /usr/include/gammu/gammu.h ]] || missing+=(libgammu-dev)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    command -v gcc >/dev/null || missing+=(gcc)
    python_headers || missing+=(python3-dev)
    if ((${#missing[@]})); then
        [[ -z $WHEELS ]] || die "python-gammu must be built here ($MACHINE, Python ${pyver:0:1}.${pyver:1}) and ${missing[*]} missing: apt install ${GAMMU_BUILD_DEPS[*]}, or put a python-gammu wheel built on such a Pi in $WHEELS"
        GAMMU_FROM="build, after: apt-get install ${GAMMU_BUILD_DEPS[*]}"
    fi
}

# Whether this Python's headers (python3-dev) are installed, for a build from source.
python_headers() {
    "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'
}

# A wheel of lgpio in DIR ($1) that this Python ($2) and machine ($3) can install.
lgpio_wheel_in() {
    [[ -n $1 ]] || return 0
    compgen -G "$1/lgpio-*-cp$2-cp$2-*$3.whl" | head -n 1 || true
}

# Without --wheels the Python packages come from the index: say so in one line before changing anything.
check_sources() {
    [[ -z $WHEELS ]] || return 0
    [[ -z ${PIP_NO_INDEX:-} ]] || return 0
    local reason
    if ! reason=$("$PYTHON" -c '
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10).close()
except Exception as exc:
    print(getattr(exc, "reason", None) or exc)
    sys.exit(1)
' "$INDEX_URL" 2>&1); then
        die "no network: cannot reach $INDEX_URL (${reason//$'\n'/ }); nothing was changed. Install offline instead: sudo scripts/install.sh --wheels DIR (docs/deploy.md, \"Offline install\")"
    fi
}

preflight() {
    if ((!DRY_RUN)) && ((EUID != 0)); then
        die "must run as root (try sudo, or --dry-run to see what it would do)"
    fi
    if ((!DRY_RUN)); then
        local tool
        for tool in systemctl systemd-sysusers systemd-tmpfiles install; do
            command -v "$tool" >/dev/null || die "missing $tool: this needs a systemd system"
        done
    fi
}

install_all() {
    command -v "$PYTHON" >/dev/null || die "no $PYTHON; install python3 and python3-venv"
    "$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON must be Python >= 3.11 with the venv module (apt install python3-venv)"
    check_platform
    # Check every source file before changing anything, so a broken checkout stops here, not halfway.
    local f
    for f in systemd/gateway.sysusers systemd/gateway.tmpfiles systemd/gatewayd.service \
        systemd/99-gateway-rs485.rules systemd/99-gateway-modem.rules docs/deploy.md "$EXAMPLE" pyproject.toml \
        "$LOCK"; do
        if [[ ! -f $f ]]; then
            ((DRY_RUN)) || die "$f missing from $REPO"
            echo "install.sh: warning: $f missing from $REPO" >&2
        fi
    done
    check_sources

    # The user first: everything after it is owned by or readable for group gateway.
    run install -D -m 0644 systemd/gateway.sysusers "$SYSUSERS_DEST"
    run systemd-sysusers "$SYSUSERS_DEST"
    run install -D -m 0644 systemd/gateway.tmpfiles "$TMPFILES_DEST"
    run systemd-tmpfiles --create "$TMPFILES_DEST"

    if [[ -x $PREFIX/venv/bin/python ]]; then
        keep "$PREFIX/venv (exists; upgrading the package in it)"
    else
        run "$PYTHON" -m venv "$PREFIX/venv"
    fi
    local build_deps=()
    [[ $LGPIO_FROM != build,* ]] || build_deps+=("${LGPIO_BUILD_DEPS[@]}")
    [[ $GAMMU_FROM != build,* ]] || build_deps+=("${GAMMU_BUILD_DEPS[@]}")
    if ((${#build_deps[@]})); then
        mapfile -t build_deps < <(printf '%s\n' "${build_deps[@]}" | sort -u)
        run apt-get install -y --no-install-recommends "${build_deps[@]}"
    fi
    local version
    version=$("$PYTHON" -c 'import platform; print(platform.python_version())')
    printf 'lgpio: %s (%s, Python %s)\n' "${LGPIO_FROM%%,*}" "$MACHINE" "$version"
    printf 'python-gammu: %s (%s, Python %s)\n' "${GAMMU_FROM%%,*}" "$MACHINE" "$version"
    # A local directory is always rebuilt and reinstalled, so this also upgrades. PYPI=1 makes lgpio's source
    # build link its C library in statically, as its PyPI wheels do: nothing else to install from apt.
    local sources=()
    [[ -z $WHEELS ]] || sources=(--no-index --find-links "$WHEELS")
    # setuptools builds in the checkout's build/ and puts all of build/lib into the wheel: modules an earlier build
    # left there (one since moved or removed, the simulator of an older layout) would be installed too.
    run rm -rf -- "$REPO/build/lib"
    # 32-bit Pi OS on a 64-bit kernel (a Pi 4 or 5): pip would judge the lock's markers by the kernel's
    # "aarch64" and take python-gammu's 64-bit pin; under the 32-bit personality it sees "armv8l", as the
    # interpreter is.
    local personality=()
    [[ $MACHINE != armv* || $(uname -m) != aarch64 ]] || personality=(setarch linux32)
    run "${personality[@]}" env PYPI=1 "$PREFIX/venv/bin/pip" install --disable-pip-version-check --constraint "$REPO/$LOCK" \
        "${sources[@]}" "$REPO" ||
        die "pip could not install the gateway (the error is above); the service was not changed. Fix it and run again${WHEELS:+ (does $WHEELS hold every wheel of $LOCK? scripts/wheelhouse makes them)}"
    # The unit runs Python with PYTHONOPTIMIZE=2, whose bytecode pip does not write; the service cannot write
    # into the venv, so without this it would compile every module at every start.
    run "$PREFIX/venv/bin/python" -m compileall -q -o 2 "$PREFIX/venv/lib"
    run install -D -m 0644 docs/deploy.md "$PREFIX/docs/deploy.md"
    # gatewayd refuses a site that is still this file unchanged (the unit passes it), at every start, boot included.
    run install -D -m 0644 "$EXAMPLE" "$PREFIX/share/building.example.toml"
    local cmd
    for cmd in "${COMMANDS[@]}"; do
        if [[ $(readlink -- "$BIN_DIR/$cmd" 2>/dev/null) == "$PREFIX/venv/bin/$cmd" ]]; then
            keep "$BIN_DIR/$cmd (links to $PREFIX/venv/bin/$cmd)"
        else
            run ln -sfn -- "$PREFIX/venv/bin/$cmd" "$BIN_DIR/$cmd"
        fi
    done

    install_shell_files

    if [[ -e $CONFIG ]]; then
        keep "$CONFIG (exists; never overwritten)"
    else
        run install -m 0640 -o root -g gateway "$EXAMPLE" "$CONFIG"
    fi

    run install -m 0644 systemd/gatewayd.service "$UNIT_DEST"
    if [[ $PREFIX != "$DEFAULT_PREFIX" ]]; then
        run sed -i "s|$DEFAULT_PREFIX/|$PREFIX/|g" "$UNIT_DEST"
    fi
    run install -D -m 0644 systemd/99-gateway-rs485.rules "$UDEV_DEST"
    run install -D -m 0644 systemd/99-gateway-modem.rules "$UDEV_MODEM_DEST"
    run install -D -m 0644 systemd/gateway-serial.conf "$MODULES_DEST"
    load_serial_drivers
    install_backoff

    run systemctl daemon-reload
    reload_udev trigger
    run systemctl enable "$UNIT"
    start_if_ready
}

# Start (or restart, after an upgrade) the service, but only for a site that has been made this building's:
# the shipped example signals supervisory at once (its NC contacts are not wired) and publishes as the
# example building.
start_if_ready() {
    local why=""
    if [[ ! -e $CONFIG ]] || cmp -s -- "$EXAMPLE" "$CONFIG"; then
        why="$CONFIG is the shipped example, unchanged"
    elif ((DRY_RUN)); then
        run "$PREFIX/venv/bin/gatewayctl" config check "$CONFIG"
    elif ! "$PREFIX/venv/bin/gatewayctl" config check "$CONFIG"; then
        why="$CONFIG does not pass 'gatewayctl config check' (the error is above)"
    fi
    if [[ -z $why ]]; then
        if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
            run systemctl restart "$UNIT"
        else
            run systemctl start "$UNIT"
        fi
        ((DRY_RUN)) || next_step "check it: gatewayctl doctor && journalctl -u ${UNIT%.service} -o cat"
        return
    fi
    keep "$UNIT not started: $why"
    if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
        keep "$UNIT still runs the previous code until it is restarted"
    fi
    next_step "edit $CONFIG for this building (docs/config.md, docs/deploy.md)"
    next_step "run: gatewayctl doctor"
    next_step "then: systemctl start $UNIT (or run this installer again)"
}

uninstall_all() {
    if [[ -e $UNIT_DEST ]] || systemctl is-enabled --quiet "$UNIT" 2>/dev/null; then
        run systemctl disable --now "$UNIT"
    fi
    run rm -f -- "$UNIT_DEST"
    run rm -f -- "$BACKOFF_DEST" "$MODULES_DEST"
    if [[ -d $(dirname -- "$BACKOFF_DEST") ]]; then
        run rmdir --ignore-fail-on-non-empty -- "$(dirname -- "$BACKOFF_DEST")"
    fi
    run systemctl daemon-reload
    run rm -f -- "$UDEV_DEST"
    run rm -f -- "$UDEV_MODEM_DEST"
    reload_udev
    run rm -f -- "$TMPFILES_DEST"
    remove_empty_dirs "$(dirname -- "$UDEV_DEST")" "$(dirname -- "$(dirname -- "$UDEV_DEST")")" \
        "$(dirname -- "$MODULES_DEST")"
    run rm -rf -- "$PREFIX/venv"
    run rm -f -- "$PREFIX/docs/deploy.md"
    run rm -f -- "$PREFIX/share/building.example.toml"
    local cmd
    for cmd in "${COMMANDS[@]}"; do
        # only our own links: a gatewayctl someone else put there stays
        if [[ $(readlink -- "$BIN_DIR/$cmd" 2>/dev/null) == "$PREFIX/venv/bin/$cmd" ]]; then
            run rm -f -- "$BIN_DIR/$cmd"
        fi
    done
    remove_shell_files
    local dir
    for dir in "$PREFIX/docs" "$PREFIX/share" "$PREFIX"; do
        if [[ -d $dir ]]; then
            run rmdir --ignore-fail-on-non-empty -- "$dir"
        fi
    done

    if ((PURGE)); then
        run rm -rf -- "$DATA_DIR"
        run rm -rf -- "$CONFIG_DIR"
        run rm -f -- "$SYSUSERS_DEST"
        remove_empty_dirs "$(dirname -- "$SYSUSERS_DEST")"
        if getent passwd gateway >/dev/null; then
            run userdel gateway
        fi
        if getent group gateway >/dev/null; then
            run groupdel gateway
        fi
        # sysusers created these only where missing; other users and packages (a modem, a console) use them
        keep "groups dialout and gpio (system groups shared with the rest of the machine)"
    else
        # The user stays too: it still owns the data, and a reused UID must not inherit it.
        keep "$DATA_DIR (event history and outbox; --purge deletes it)"
        keep "$CONFIG_DIR (site config; --purge deletes it)"
        keep "user gateway and $SYSUSERS_DEST (own the data; --purge deletes them)"
    fi
}

# -- shell completion (bash, zsh) and the man page, generated from gatewayctl's own argument parser ----------
readonly SHELL_FILES=(
    "completion bash:/usr/local/share/bash-completion/completions/gatewayctl"
    "completion zsh:/usr/local/share/zsh/site-functions/_gatewayctl"
    "man:/usr/local/share/man/man1/gatewayctl.1"
)

install_shell_files() {
    local item what dest tmp=/tmp/gatewayctl-shell
    if ((!DRY_RUN)); then
        tmp=$(mktemp -d)
    fi
    for item in "${SHELL_FILES[@]}"; do
        what=${item%%:*}
        dest=${item#*:}
        if ((DRY_RUN)); then
            printf 'would: %q -m gateway.ops.shell %s > %q\n' "$PREFIX/venv/bin/python" "$what" "$tmp/file"
        else
            # shellcheck disable=SC2086 # $what is "completion bash" or "man": two words or one
            "$PREFIX/venv/bin/python" -m gateway.ops.shell $what >"$tmp/file"
        fi
        run install -D -m 0644 "$tmp/file" "$dest"
    done
    ((DRY_RUN)) || rm -rf -- "$tmp"
    if command -v mandb >/dev/null; then
        run mandb -q
    fi
}

remove_shell_files() {
    local item
    for item in "${SHELL_FILES[@]}"; do
        run rm -f -- "${item#*:}"
    done
    # the folders install -D made for them, deepest first (not /usr/local/share/man: Debian makes it);
    # remove_empty_dirs keeps any that is not empty or that a package owns
    remove_empty_dirs /usr/local/share/bash-completion/completions /usr/local/share/bash-completion \
        /usr/local/share/zsh/site-functions /usr/local/share/zsh /usr/local/share/man/man1
}

main() {
    parse_args "$@"
    preflight
    REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
    readonly REPO
    cd -- "$REPO"
    if ((UNINSTALL)); then
        uninstall_all
    else
        install_all
    fi
}

main "$@"
