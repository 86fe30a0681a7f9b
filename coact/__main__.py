from coact.cli import main

main()
