from gns_sweep_cli.main import main

main()
