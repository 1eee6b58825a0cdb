"""`python -m tusingest` is the same as the `tusingest` command."""

from tusingest.cli import main

if __name__ == "__main__":
    main()
