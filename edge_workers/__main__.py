from edge_workers.main import main

main()
