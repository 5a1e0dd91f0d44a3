"""Users' behaviour histories without look-ahead: pointers into a table of past positives.

A user's *history* at an example is the list of their latest ``n`` positive events strictly before the
example: events of the same user, not sampled negatives, whose primary label (the first label column)
is 1, and whose ``time`` *and* ``seq`` are both smaller than the example's. Requiring both is what "no
leakage" means here: ``seq`` alone would let an event that shares the example's timestamp (a tie broken
by source order) into the history, ``time`` alone would rely on timestamps being distinct within a
user. A sampled negative shares the ``seq`` and ``time`` of its positive, so that positive is never in
its negatives' histories either.

History crosses splits on purpose: a test example's history may hold the user's valid (and train)
positives, since they happened before it. Events of cold-start items are kept too (a user did watch
them); the model sees such items through their codes, their ID being out of vocabulary.

Everything is vectorised. :class:`HistoryIndex` keeps the positives sorted by (user, seq) and, for every
example row, one integer: the number of the user's positives that precede it (``cutoff``). A history
is then the ``n`` positives just before the cutoff, gathered for a whole batch with one fancy index.
"""

from __future__ import annotations

import numpy as np

from qarm.errors import DataError

PAD = -1  # the item id of an empty history slot

# Ranks (of seq and of time) are below 2**32 for any table that fits in memory, so
# ``user * 2**32 + rank`` orders rows by (user, rank) in one int64 key.
_SHIFT = np.int64(2**32)


class HistoryIndex:
    """Every example row's position in its user's sequence of positives.

    Parameters
    ----------
    user, item, time, seq : int arrays of shape (n_rows,)
        The interaction table's columns, in any order.
    positive : bool array of shape (n_rows,)
        Rows that enter histories: source events (not sampled negatives) with primary label 1.

    Attributes
    ----------
    items : int64 array of shape (n_positives,)
        The positives' item ids, sorted by (user, seq).
    users, seq, time : int64 arrays of shape (n_positives,)
        Their user, ``seq`` and ``time``, in the same order.
    cutoff : int64 array of shape (n_rows,)
        For row ``r``: the index into ``items`` one past the user's last positive before ``r``.
    start : int64 array of shape (n_rows,)
        For row ``r``: the index into ``items`` of the user's first positive.

    Raises
    ------
    DataError
        If a user's ``time`` decreases while ``seq`` increases (``seq`` must be chronological).
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, time: np.ndarray, seq: np.ndarray,
                 positive: np.ndarray) -> None:
        user = np.asarray(user, dtype=np.int64)
        time = np.asarray(time, dtype=np.int64)
        seq = np.asarray(seq, dtype=np.int64)
        positive = np.asarray(positive, dtype=bool)
        n = len(user)
        if not all(len(a) == n for a in (item, time, seq, positive)):
            raise DataError("user, item, time, seq and positive must have the same length")
        _check_chronological(user, time, seq)
        # Dense ranks keep the combined keys below 2**32 per user whatever the time unit (seconds, ms).
        time_rank = np.unique(time, return_inverse=True)[1].astype(np.int64)
        seq_rank = np.unique(seq, return_inverse=True)[1].astype(np.int64)
        seq_key = user * _SHIFT + seq_rank
        time_key = user * _SHIFT + time_rank

        pos = np.flatnonzero(positive)
        order = pos[np.lexsort((seq[pos], user[pos]))]
        self.items = np.asarray(item, dtype=np.int64)[order]
        self.seq = seq[order]
        self.time = time[order]
        pos_user = user[order]
        self.users = pos_user
        # time is non-decreasing in seq within a user, so both keys are sorted in this order.
        pos_seq_key, pos_time_key = seq_key[order], time_key[order]
        self.cutoff = np.minimum(np.searchsorted(pos_seq_key, seq_key, side="left"),
                                 np.searchsorted(pos_time_key, time_key, side="left")).astype(np.int64)
        self.start = np.searchsorted(pos_user, user, side="left").astype(np.int64)

    @property
    def n_positives(self) -> int:
        return len(self.items)

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        """The full (untruncated) number of past positives of each row: int64 ``(len(rows),)``."""
        return self.cutoff[rows] - self.start[rows]

    def gather(self, rows: np.ndarray, length: int) -> np.ndarray:
        """The latest ``length`` past positives of each row, most recent first.

        Parameters
        ----------
        rows : int array of shape (B,)
            Row indices into the interaction table this index was built from.
        length : int
            ``n``, the number of history slots.

        Returns
        -------
        int64 array of shape (B, length): item ids, ``history[b, 0]`` the latest; empty slots hold
        :data:`PAD` (-1), always after the filled ones.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cutoff, start = self.cutoff[rows], self.start[rows]
        position = cutoff[:, None] - 1 - np.arange(length, dtype=np.int64)[None, :]  # (B, n)
        filled = position >= start[:, None]
        history = self.items[np.where(filled, position, 0)] if self.n_positives else np.zeros(position.shape,
                                                                                               np.int64)
        history[~filled] = PAD
        return history

    def positions(self, rows: np.ndarray, length: int) -> np.ndarray:
        """Like :meth:`gather` but the positives' indices into :attr:`items` (-1 for empty slots);
        for checks: ``self.seq[p]`` and ``self.time[p]`` are the events' ``seq`` and ``time``."""
        rows = np.asarray(rows, dtype=np.int64)
        position = self.cutoff[rows][:, None] - 1 - np.arange(length, dtype=np.int64)[None, :]
        return np.where(position >= self.start[rows][:, None], position, -1)


def _check_chronological(user: np.ndarray, time: np.ndarray, seq: np.ndarray) -> None:
    """Within each user, ordering by seq must not make time go backwards."""
    if len(user) < 2:
        return
    order = np.lexsort((time, seq, user))
    u, t = user[order], time[order]
    same_user = u[1:] == u[:-1]
    backwards = same_user & (t[1:] < t[:-1])
    if backwards.any():
        bad = np.unique(u[1:][backwards])
        raise DataError("seq is not chronological: time decreases while seq increases for some users",
                        column="seq", ids=bad)
