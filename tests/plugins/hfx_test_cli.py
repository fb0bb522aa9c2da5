"""A plugin-contributed command, imported only when `hfx hello` runs."""


def main(argv):
    print("hello " + " ".join(argv))
    return 3 if "fail" in argv else 0
