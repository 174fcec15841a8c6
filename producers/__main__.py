from producers.main import main

main()
