from custos.cli.main import main

main()
