from tiered.cli.main import main

main()
