"""Run a script as if a folder were a filesystem of its own, of a given size; test-only.

    python -m tests.small_disk FOLDER BYTES script.py ARGS...

shutil.disk_usage of a path inside FOLDER reports BYTES less what FOLDER holds. How
tests/test_faults_os.py fills a disk where it cannot mount a small tmpfs (not root): the run's
free-space check (checkpoint.check_space) sees the disk fill up as it would on a real one.
"""
import os
import runpy
import shutil
import sys


def main():
    folder, size, script, *argv = sys.argv[1:]
    folder, size = os.path.abspath(folder), int(size)
    real = shutil.disk_usage

    def usage(path):
        path = os.path.abspath(path)
        if path != folder and not path.startswith(folder + os.sep):
            return real(path)
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
        return real(path)._replace(total=size, used=used, free=max(size - used, 0))

    shutil.disk_usage = usage
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
