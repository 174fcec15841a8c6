from alerting.main import main

main()
