"""Entry point: `python -m microservices.iptv` serves until SIGTERM/SIGINT."""

from microservices.iptv.service import svc

if __name__ == "__main__":
    svc.run()
