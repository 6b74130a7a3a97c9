"""`python -m agent` is `meshlet`."""

from agent.cli import main

main()
