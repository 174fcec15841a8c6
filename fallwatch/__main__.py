from fallwatch.cli import main

main()
