from thinmgr.cli.main import main

main()
