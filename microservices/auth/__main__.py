"""Entry point: `python -m microservices.auth` serves until SIGTERM/SIGINT."""

from microservices.auth.service import svc

if __name__ == "__main__":
    svc.run()
