from opd_lightning.cli import main

main()
