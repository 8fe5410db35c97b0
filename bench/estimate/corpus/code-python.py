import json
import time
from dataclasses import dataclass, field


@dataclass
class Bucket:
    """Token bucket: `rate` tokens per second, at most `burst` saved up."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self):
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def load_limits(path):
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {user: Bucket(rate=v["rps"], burst=v.get("burst", v["rps"] * 2)) for user, v in raw.items()}


if __name__ == "__main__":
    limits = load_limits("limits.json")
    allowed = sum(limits["alice"].take() for _ in range(100))
    print(f"allowed {allowed} of 100 requests")
