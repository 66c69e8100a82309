from fastinfer.worker.process import main

main()
