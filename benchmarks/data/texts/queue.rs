use std::collections::VecDeque;

/// A bounded queue that drops the oldest element when full.
pub struct Ring<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T: Clone> Ring<T> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "capacity must be positive");
        Ring { items: VecDeque::with_capacity(capacity), capacity }
    }

    pub fn push(&mut self, value: T) -> Option<T> {
        let dropped = if self.items.len() == self.capacity {
            self.items.pop_front()
        } else {
            None
        };
        self.items.push_back(value);
        dropped
    }
}
