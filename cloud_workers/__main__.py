from cloud_workers.main import main

main()
