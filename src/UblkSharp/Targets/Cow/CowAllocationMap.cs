namespace UblkSharp.Targets.Cow;

/// <summary>
/// Which chunks of a COW file's data area were allocated ahead of their first write. A new
/// overlay is sparse, and a file system fills a hole one small write at a time: a block
/// allocation and an extent split for each 4 KiB, in a random order. Allocating a whole chunk
/// with one fallocate the first time a write reaches it (as qcow2 allocates a whole cluster)
/// makes the later writes in it plain overwrites. The map only saves repeated fallocate calls:
/// it says nothing about the data (the bitmap does), so a lost or stale entry costs one more
/// fallocate or one slower write, never a wrong read. Safe for several queues at once.
/// </summary>
internal sealed class CowAllocationMap
{
    private readonly ulong[] _words;
    private readonly int _shift;
    private readonly long _size;
    private volatile bool _off;

    /// <param name="size">The device's size in bytes (the data area's length).</param>
    /// <param name="chunk">The chunk size: a power of two, at least 4096.</param>
    public CowAllocationMap(long size, long chunk)
    {
        if (chunk < 4096 || (chunk & (chunk - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(chunk), chunk, "an allocation chunk is a power of two of at least 4 KiB");
        }
        _shift = System.Numerics.BitOperations.Log2((ulong)chunk);
        _size = size;
        var chunks = (size + chunk - 1) >> _shift;
        _words = new ulong[(chunks + 63) / 64];
    }

    public long Chunk => 1L << _shift;

    /// <summary>
    /// The range of the device (chunk-aligned, clipped to its end) to allocate before a write of
    /// <paramref name="length"/> bytes at <paramref name="offset"/>: from its first chunk not yet
    /// allocated to its last. False when there is none.
    /// </summary>
    public bool NeedsAllocation(long offset, long length, out long start, out long count)
    {
        start = count = 0;
        if (_off || length <= 0)
        {
            return false;
        }
        long first = offset >> _shift, last = (offset + length - 1) >> _shift;
        while (first <= last && IsSet(first))
        {
            first++;
        }
        if (first > last)
        {
            return false;
        }
        while (IsSet(last))
        {
            last--;
        }
        start = first << _shift;
        count = Math.Min((last + 1) << _shift, _size) - start;
        return true;
    }

    /// <summary>The chunks of a range that <see cref="NeedsAllocation"/> gave are allocated.</summary>
    public void MarkAllocated(long start, long count)
    {
        for (long c = start >> _shift, end = (start + count - 1) >> _shift; c <= end; c++)
        {
            Interlocked.Or(ref _words[c >> 6], 1ul << (int)(c & 63));
        }
    }

    /// <summary>A hole was punched in this range: each chunk it touches may have holes again.</summary>
    public void Forget(long offset, long length)
    {
        if (length <= 0)
        {
            return;
        }
        for (long c = offset >> _shift, end = (offset + length - 1) >> _shift; c <= end; c++)
        {
            Interlocked.And(ref _words[c >> 6], ~(1ul << (int)(c & 63)));
        }
    }

    /// <summary>The file system cannot allocate ahead: stop asking.</summary>
    public void Disable() => _off = true;

    private bool IsSet(long c) => (Volatile.Read(ref _words[c >> 6]) & (1ul << (int)(c & 63))) != 0;
}
