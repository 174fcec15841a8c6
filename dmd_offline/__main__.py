from dmd_offline.cli import main

main()
