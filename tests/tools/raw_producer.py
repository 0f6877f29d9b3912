"""A Kafka producer that writes what well-behaved clients refuse to: header keys that are not
UTF-8 (Go clients and the raw protocol allow any bytes). Run as a script with aiokafka's C
extensions off (``AIOKAFKA_NO_EXTENSIONS=1``) so that its pure-Python record builder takes the
raw key:

    python raw_producer.py BOOTSTRAP TOPIC PARTITION BEFORE A BAD C AFTER

It writes, to one partition: the value BEFORE, then one batch of three records A, BAD and C
where BAD has the header key ``b"\\xff\\xfe"``, then AFTER. Prints the offsets of the five.
"""

from __future__ import annotations

import asyncio
import sys

from aiokafka import AIOKafkaProducer


class RawKey(str):
    """A header key whose encoding is not UTF-8 (what the wire carries as the key)."""

    def encode(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
        return b"\xff\xfe"


async def main(bootstrap: str, topic: str, partition: int, values: list[bytes]) -> None:
    before, a, bad, c, after = values
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        offsets = [(await producer.send_and_wait(topic, before, partition=partition)).offset]
        batch = producer.create_batch()
        batch.append(key=None, value=a, timestamp=None)
        batch.append(key=None, value=bad, timestamp=None, headers=[(RawKey("k"), b"v")])
        batch.append(key=None, value=c, timestamp=None)
        sent = await (await producer.send_batch(batch, topic, partition=partition))
        offsets += [sent.offset, sent.offset + 1, sent.offset + 2]
        offsets.append((await producer.send_and_wait(topic, after, partition=partition)).offset)
        print(" ".join(map(str, offsets)))
    finally:
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), [v.encode() for v in sys.argv[4:9]])
    )
