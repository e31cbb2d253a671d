import sys

def main(argv=None):
    raise SystemExit("not implemented")
