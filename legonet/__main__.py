from legonet.cli import main

main()
