from agentkernel.cli.app import main

main()
