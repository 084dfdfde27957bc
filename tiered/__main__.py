from tiered.cli import main

main()
