"""`python -m gns_sweep_cli ...` runs the gns-sweep command."""

from gns_sweep_cli.main import main

main()
