from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    quantity: int = 0
    tags: list[str] = field(default_factory=list)


class Inventory:
    """Counts of items by name; quantities never go below zero."""

    def __init__(self):
        self._items: dict[str, Item] = {}

    def add(self, name: str, n: int = 1) -> Item:
        if n < 0:
            raise ValueError(f"cannot add a negative amount ({n})")
        item = self._items.setdefault(name, Item(name))
        item.quantity += n
        return item

    def total(self) -> int:
        return sum(i.quantity for i in self._items.values())
