from agentkernel.cli.thin import main

main()
