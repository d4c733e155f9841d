# Sourced: sets PYTHON to an absolute path for the interpreter named by $1
# (a path, kept unresolved so that a venv's python stays the venv's, or a command name).
if [[ $1 == */* ]]; then
    PYTHON=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
else
    PYTHON=$(command -v "$1")
fi
