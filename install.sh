#!/bin/sh
# Creates .venv (or $VENV) and installs distmulti into it, editable, with the
# test extra. Usage: sh install.sh [extra pip arguments, e.g. '.[gpu,test]']
#
# chainer 7.8.1 is an sdist: its build imports pkg_resources (removed in
# setuptools 82) and `import chainer` needs setuptools<74 and numpy<2. pip
# builds it in an isolated environment, so the constraints must reach that
# build too: pip < 26.2 reads PIP_CONSTRAINT there, pip >= 26.2 reads only
# PIP_BUILD_CONSTRAINT. Setting both works with pip 23 through 26.
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# constraints-numpy2.txt instead gives the numpy 2 environment (docs/compat.md, "numpy 2").
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}

if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] < (3, 13)))'; then
    echo "install.sh: $("$PYTHON" -V 2>&1) found; distmulti needs Python 3.9 to 3.12." \
         "Set PYTHON=python3.11 (or another Python in that range)." >&2
    exit 2
fi
if [ ! -f "$CONSTRAINTS" ]; then
    echo "install.sh: constraints file $CONSTRAINTS not found" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP_CONSTRAINT="$PWD/$CONSTRAINTS"
PIP_BUILD_CONSTRAINT="$PWD/$CONSTRAINTS"
PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_CONSTRAINT PIP_BUILD_CONSTRAINT PIP_DISABLE_PIP_VERSION_CHECK
if [ "$#" -eq 0 ]; then
    set -- -e '.[test]'
fi
"$VENV/bin/python" -m pip install "$@"
echo "install.sh: distmulti installed in $VENV ($("$VENV/bin/distmulti" --version))"
