using System.Buffers.Binary;
using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Targets.Qcow2;

/// <summary>Sees every write and data sync a writable image makes to its file, in order (a test hook for crash ordering).</summary>
internal interface IQcow2WriteLog
{
    void Write(long offset, ReadOnlySpan<byte> data);

    void Sync();
}

/// <summary>
/// Writes to the top image of a chain (qcow2 v2 and v3, standard L2 entries, no internal snapshots).
/// <para>
/// Allocation appends: new clusters are taken from a cursor that starts past the end of the file
/// and past the last cluster with a refcount, so every cluster at or after it is free. Freed
/// clusters (discard, a rewritten compressed cluster) get refcount 0 and are not reused in the
/// same session, so a stale pointer to one never sees another's data.
/// </para>
/// <para>
/// Order (qemu's): a cluster's refcount and its data are written, then fdatasync, then the L2
/// entry that points to it; a new L2 table is written zeroed and refcounted, fdatasync, then its
/// L1 entry; a new refcount block is written (counting itself, or counted in another block),
/// fdatasync, then its refcount table entry, fdatasync; a new refcount table is written with its
/// blocks, fdatasync, then the header switched to it, fdatasync, then the old table freed. A cluster
/// is freed only after the entry that pointed to it is written and synced. So a crash at any point
/// (of the daemon, or of the machine with the disk honouring flushes) leaves at worst leaked
/// clusters (refcount above the references: `qemu-img check` exit 3), never a reference to a
/// cluster whose refcount is too low. Refcounts are always kept exact, so lazy_refcounts images
/// are written the same way and their dirty bit is never needed.
/// </para>
/// <para>
/// Threads: a write to a cluster whose L2 entry has COPIED (refcount exactly 1, data in place)
/// finds its host offset under <c>_metadata</c> and writes the data with pwrite outside any lock.
/// Everything that allocates, frees or changes a table runs under <c>_write</c>, one at a time;
/// changes to what readers see (L1, cached L2 tables, the file length) take <c>_metadata</c> too.
/// </para>
/// </summary>
internal sealed partial class Qcow2Image
{
    private const ulong CopiedBit = 1ul << 63;
    private const ulong RefTableOffsetMask = 0xffff_ffff_ffff_fe00;

    private readonly Lock _write = new();
    private bool _writable;
    private bool _failed;
    private int _refBits;
    private int _blockBits;
    private ulong _refMax;
    private ulong[] _refTable = [];
    private long _refTableOffset;
    private long _refTableClusters;
    private readonly Dictionary<long, byte[]> _refBlocks = [];
    private long _next;
    private byte[]? _scratch;
    private byte[]? _zeroCluster;
    private readonly List<(int Index, ulong Entry, ulong Old)> _pending = [];

    /// <summary>The test hook that sees every write and sync, or null.</summary>
    internal IQcow2WriteLog? WriteLog { get; set; }

    public bool Writable => _writable;

    /// <summary>The cluster index new clusters are taken from (all clusters from it on are free).</summary>
    internal long NextFreeCluster => _next;

    /// <summary>Makes this image writable: reads its refcount table and finds the end of what is in use. The caller checked the features.</summary>
    internal void OpenForWrite()
    {
        _refBits = 1 << Header.RefcountOrder;
        _blockBits = _clusterBits + 3 - Header.RefcountOrder;
        _refMax = _refBits == 64 ? ulong.MaxValue : (1ul << _refBits) - 1;
        _refTableOffset = Header.RefcountTableOffset;
        _refTableClusters = Header.RefcountTableClusters;
        var bytes = new byte[_refTableClusters << _clusterBits];
        if (ReadFile(bytes, _refTableOffset) < 0)
        {
            throw new IOException($"{Path}: cannot read its refcount table");
        }
        _refTable = new ulong[bytes.Length / 8];
        for (var i = 0; i < _refTable.Length; i++)
        {
            _refTable[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * 8));
        }
        for (var i = 0; i < _l1.Length; i++)
        {
            if ((_l1[i] & L1OffsetMask) != 0 && (_l1[i] & CopiedBit) == 0)
            {
                throw new Qcow2FormatException($"{Path}: L2 table {i} is shared (no COPIED flag: refcount above 1), which this writer does not copy; open it read-only");
            }
        }
        // The last cluster in use: the highest non-zero refcount of the last refcount block.
        long last = -1;
        for (var t = _refTable.Length - 1; t >= 0 && last < 0; t--)
        {
            if (_refTable[t] == 0)
            {
                continue;
            }
            var block = LoadBlock(t);
            for (var j = (1 << _blockBits) - 1; j >= 0; j--)
            {
                if (GetEntry(block, j) != 0)
                {
                    last = ((long)t << _blockBits) + j;
                    break;
                }
            }
        }
        _next = Math.Max((FileLength + _clusterMask) >> _clusterBits, last + 1);
        _writable = true;
        if (_version >= 3 && Header.AutoclearFeatures != 0)
        {
            // Autoclear bits (e.g. consistent bitmaps) say "unchanged by an older writer": we are one, so clear them first.
            Span<byte> zero = stackalloc byte[8];
            WriteRaw(zero, 88);
            Sync();
        }
    }

    /// <summary>Writes guest bytes; 0 or a negative errno.</summary>
    public int Write(ReadOnlySpan<byte> data, long offset)
    {
        var done = 0;
        while (done < data.Length)
        {
            var pos = offset + done;
            var n = (int)Math.Min(data.Length - done, (_clusterMask + 1) - (pos & _clusterMask));
            var chunk = data.Slice(done, n);
            long host;
            lock (_metadata)
            {
                host = InPlace(pos);
            }
            if (host > 0)
            {
                // Refcount 1 and data in place: nothing but the data changes.
                var r = WriteData(chunk, host + (pos & _clusterMask));
                if (r < 0)
                {
                    return r;
                }
            }
            else
            {
                // Everything from here to the end of the request or of this L2 table's range, in one run.
                var tableEnd = ((pos / Header.BytesPerL1Entry) + 1) * Header.BytesPerL1Entry;
                n = (int)Math.Min(data.Length - done, tableEnd - pos);
                int r;
                lock (_write)
                {
                    r = _failed ? -Errno.EIO : TryWriteRun(data.Slice(done, n), pos);
                }
                if (r < 0)
                {
                    return r;
                }
            }
            done += n;
        }
        return 0;
    }

    /// <summary>Zeroes guest bytes: whole clusters through their L2 entries (zero flag, or deallocated), partial ones by writing zeros. 0 or a negative errno.</summary>
    public int Zero(long offset, long length)
    {
        var end = offset + length;
        var pos = offset;
        var clusterSize = _clusterMask + 1;
        while (pos < end)
        {
            var clusterStart = pos & ~_clusterMask;
            var clusterEnd = clusterStart + clusterSize;
            if (pos != clusterStart || (end < clusterEnd && end < Size))
            {
                var n = (int)(Math.Min(end, clusterEnd) - pos);
                _zeroCluster ??= new byte[clusterSize];
                var r = Write(_zeroCluster.AsSpan(0, n), pos);
                if (r < 0)
                {
                    return r;
                }
                pos += n;
                continue;
            }
            // Whole clusters (the last one of the image may be cut by its size), within this L2 table's range.
            var tableEnd = ((pos / Header.BytesPerL1Entry) + 1) * Header.BytesPerL1Entry;
            var runEnd = pos;
            while (runEnd < end && runEnd < tableEnd && (runEnd + clusterSize <= end || end >= Size))
            {
                runEnd += clusterSize;
            }
            int rz;
            lock (_write)
            {
                rz = _failed ? -Errno.EIO : TryZeroClusters(pos, runEnd);
            }
            if (rz < 0)
            {
                return rz;
            }
            pos = Math.Min(runEnd, end);
        }
        return 0;
    }

    /// <summary>fdatasync of the image file; 0 or a negative errno.</summary>
    public int Flush()
    {
        try
        {
            Sync();
            return 0;
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }

    private int TryWriteRun(ReadOnlySpan<byte> chunk, long pos)
    {
        try
        {
            WriteRun(chunk, pos);
            return 0;
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            // What is in memory may no longer match the file: no more metadata changes this session.
            _failed = true;
            return -Errno.EIO;
        }
    }

    private int TryZeroClusters(long from, long to)
    {
        try
        {
            ZeroClusters(from, to);
            return 0;
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            _failed = true;
            return -Errno.EIO;
        }
    }

    /// <summary>The host offset of the cluster holding <paramref name="pos"/> when it can be written in place (COPIED data cluster), else 0. Under <c>_metadata</c>.</summary>
    private long InPlace(long pos)
    {
        var l1Index = pos / Header.BytesPerL1Entry;
        if (!_writable || _failed || l1Index >= _l1.Length)
        {
            return 0;
        }
        var l1 = _l1[l1Index];
        var l2Offset = (long)(l1 & L1OffsetMask);
        if (l2Offset == 0 || (l1 & CopiedBit) == 0 || (l2Offset & _clusterMask) != 0)
        {
            return 0;
        }
        if (_cache.Get(File, l2Offset, out var table) < 0)
        {
            return 0;
        }
        var entry = Qcow2L2Cache.Entry(table, (int)((pos >> _clusterBits) & _l2Mask), _entrySize);
        var host = (long)(entry & L2OffsetMask);
        if ((entry & (CompressedBit | ZeroBit)) != 0 || (entry & CopiedBit) == 0 || host == 0 || (host & _clusterMask) != 0 || host >= FileLength)
        {
            return 0;
        }
        return host;
    }

    private int WriteData(ReadOnlySpan<byte> data, long fileOffset)
    {
        try
        {
            WriteRaw(data, fileOffset);
            return 0;
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }

    // Under _write: guest bytes within one L2 table's range. Clusters that can be written in place
    // are; the others get new clusters (refcount and data written), then one fdatasync, then their
    // L2 entries, then (after another fdatasync) the clusters they replaced are freed.
    private void WriteRun(ReadOnlySpan<byte> data, long offset)
    {
        var clusterSize = (int)(_clusterMask + 1);
        var l1Index = (int)(offset / Header.BytesPerL1Entry);
        long l2Offset = -1;
        var pending = _pending;
        pending.Clear();
        var done = 0;
        while (done < data.Length)
        {
            var pos = offset + done;
            var n = (int)Math.Min(data.Length - done, clusterSize - (pos & _clusterMask));
            var chunk = data.Slice(done, n);
            long host;
            lock (_metadata)
            {
                host = InPlace(pos);
            }
            if (host > 0)
            {
                WriteRaw(chunk, host + (pos & _clusterMask));
                done += n;
                continue;
            }
            var clusterStart = pos & ~_clusterMask;
            var buffer = _scratch ??= new byte[clusterSize];
            if (n < clusterSize)
            {
                // Copy on write: the rest of the cluster as it reads now (backing data, zeros, a compressed or shared cluster).
                if (Read(buffer, clusterStart) < 0)
                {
                    throw new IOException($"{Path}: cannot read the cluster at {clusterStart} to copy it");
                }
            }
            chunk.CopyTo(buffer.AsSpan((int)(pos - clusterStart)));
            if (l2Offset < 0)
            {
                l2Offset = EnsureL2(l1Index);
            }
            var index = (int)((pos >> _clusterBits) & _l2Mask);
            var old = L2Entry(l2Offset, index);
            var cluster = Allocate();
            WriteRaw(buffer, cluster << _clusterBits);
            pending.Add((index, ((ulong)cluster << _clusterBits) | CopiedBit, old));
            done += n;
        }
        if (pending.Count == 0)
        {
            return;
        }
        Sync();
        var freeing = false;
        foreach (var (index, entry, old) in pending)
        {
            SetL2Entry(l2Offset, index, entry);
            freeing |= IsStored(old);
        }
        if (freeing)
        {
            Sync();
            foreach (var (_, _, old) in pending)
            {
                Release(old);
            }
        }
        pending.Clear();
    }

    // Under _write: whole clusters [from, to), all within one L2 table.
    private void ZeroClusters(long from, long to)
    {
        var l1Index = (int)(from / Header.BytesPerL1Entry);
        if (l1Index >= _l1.Length)
        {
            throw new IOException($"{Path}: offset {from} is past its L1 table");
        }
        var l2Offset = (long)(_l1[l1Index] & L1OffsetMask);
        if (l2Offset == 0 && Backing is null)
        {
            return; // Unallocated without a backing file already reads as zeros.
        }
        if (Backing is not null && _version < 3)
        {
            // Version 2 has no zero flag, and deallocating would show the backing file: write zeros.
            _zeroCluster ??= new byte[_clusterMask + 1];
            for (var pos = from; pos < to; pos += _clusterMask + 1)
            {
                WriteRun(_zeroCluster.AsSpan(0, (int)Math.Min(_clusterMask + 1, to - pos)), pos);
            }
            return;
        }
        l2Offset = EnsureL2(l1Index);
        var wanted = Backing is null ? 0 : ZeroBit;
        List<ulong>? freed = null;
        for (var pos = from; pos < to; pos += _clusterMask + 1)
        {
            var index = (int)((pos >> _clusterBits) & _l2Mask);
            var old = L2Entry(l2Offset, index);
            if (old == wanted)
            {
                continue;
            }
            SetL2Entry(l2Offset, index, wanted);
            (freed ??= []).Add(old);
        }
        if (freed is not null)
        {
            Sync();
            foreach (var old in freed)
            {
                Release(old);
            }
        }
    }

    private ulong L2Entry(long l2Offset, int index)
    {
        lock (_metadata)
        {
            if (_cache.Get(File, l2Offset, out var table) < 0)
            {
                throw new IOException($"{Path}: cannot read the L2 table at {l2Offset}");
            }
            return Qcow2L2Cache.Entry(table, index, _entrySize);
        }
    }

    private void SetL2Entry(long l2Offset, int index, ulong entry)
    {
        Span<byte> bytes = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(bytes, entry);
        WriteRaw(bytes, l2Offset + ((long)index * _entrySize));
        lock (_metadata)
        {
            _cache.Patch(l2Offset, index, _entrySize, entry);
        }
    }

    private static bool IsStored(ulong entry) => (entry & CompressedBit) != 0 || (entry & L2OffsetMask) != 0;

    // Decrements the refcounts an L2 entry held: its data cluster, or every cluster a compressed one touches.
    private void Release(ulong entry)
    {
        if ((entry & CompressedBit) != 0)
        {
            var coffset = (long)(entry & _coffsetMask) & ~511L;
            var sectors = (long)((entry >> _csizeShift) & _csizeMask) + 1;
            var first = coffset >> _clusterBits;
            var last = (coffset + (sectors * 512) - 1) >> _clusterBits;
            for (var c = first; c <= last; c++)
            {
                AddRef(c, -1);
            }
        }
        else if ((entry & L2OffsetMask) != 0)
        {
            AddRef((long)(entry & L2OffsetMask) >> _clusterBits, -1);
        }
    }

    // The L2 table of an L1 entry, allocated (zeroed, refcounted, synced, then linked) when there is none.
    private long EnsureL2(int l1Index)
    {
        if (l1Index >= _l1.Length)
        {
            throw new IOException($"{Path}: L1 index {l1Index} is past its L1 table");
        }
        var l2Offset = (long)(_l1[l1Index] & L1OffsetMask);
        if (l2Offset != 0)
        {
            if ((_l1[l1Index] & CopiedBit) == 0 || (l2Offset & _clusterMask) != 0)
            {
                throw new IOException($"{Path}: L2 table {l1Index} is shared or unaligned");
            }
            return l2Offset;
        }
        var cluster = Allocate();
        l2Offset = cluster << _clusterBits;
        _zeroCluster ??= new byte[_clusterMask + 1];
        WriteRaw(_zeroCluster, l2Offset);
        Sync();
        var entry = (ulong)l2Offset | CopiedBit;
        Span<byte> bytes = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(bytes, entry);
        WriteRaw(bytes, Header.L1TableOffset + (l1Index * 8L));
        lock (_metadata)
        {
            _l1[l1Index] = entry;
        }
        return l2Offset;
    }

    /// <summary>A new cluster with refcount 1 (written; synced when a new refcount block was needed).</summary>
    private long Allocate()
    {
        var cluster = _next++;
        AddRef(cluster, 1);
        return cluster;
    }

    private void AddRef(long cluster, int delta)
    {
        var blockOffset = EnsureBlock(cluster);
        var block = _refBlocks[blockOffset];
        var index = (int)(cluster & ((1L << _blockBits) - 1));
        var value = GetEntry(block, index);
        if ((delta < 0 && value == 0) || (delta > 0 && value == _refMax))
        {
            throw new IOException($"{Path}: refcount of cluster {cluster} would go {(delta < 0 ? "below 0" : "past its maximum")}");
        }
        var (at, count) = SetEntry(block, index, delta < 0 ? value - 1 : value + 1);
        WriteRaw(block.AsSpan(at, count), blockOffset + at);
    }

    private byte[] LoadBlock(long tableIndex)
    {
        var offset = (long)(_refTable[tableIndex] & RefTableOffsetMask);
        if (_refBlocks.TryGetValue(offset, out var block))
        {
            return block;
        }
        if ((offset & _clusterMask) != 0 || offset >= FileLength)
        {
            throw new IOException($"{Path}: refcount block {tableIndex} at {offset} is unaligned or outside the file");
        }
        block = new byte[_clusterMask + 1];
        if (ReadFile(block, offset) < 0)
        {
            throw new IOException($"{Path}: cannot read refcount block {tableIndex}");
        }
        _refBlocks[offset] = block;
        return block;
    }

    /// <summary>The offset of the refcount block that counts <paramref name="cluster"/>, made when missing (and the table grown when too short).</summary>
    private long EnsureBlock(long cluster)
    {
        while (true)
        {
            var tableIndex = cluster >> _blockBits;
            if (tableIndex < _refTable.Length)
            {
                if (_refTable[tableIndex] != 0)
                {
                    LoadBlock(tableIndex);
                    return (long)(_refTable[tableIndex] & RefTableOffsetMask);
                }
                var at = _next++;
                var block = new byte[_clusterMask + 1];
                if (at >> _blockBits == tableIndex)
                {
                    SetEntry(block, (int)(at & ((1L << _blockBits) - 1)), 1); // It counts itself.
                }
                else
                {
                    AddRef(at, 1);
                }
                var offset = at << _clusterBits;
                WriteRaw(block, offset);
                Sync();
                _refBlocks[offset] = block;
                _refTable[tableIndex] = (ulong)offset;
                Span<byte> bytes = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64BigEndian(bytes, (ulong)offset);
                WriteRaw(bytes, _refTableOffset + (tableIndex * 8));
                // qemu's flush here; the sync before the next L2 entry would cover it too.
                Sync();
                return offset;
            }
            GrowTable(tableIndex);
        }
    }

    /// <summary>
    /// A bigger refcount table, at the end of the file with new refcount blocks for every table
    /// entry past the old ones up to its own end (counting the new table and blocks in them):
    /// written and synced, then the header switched to it and synced, then the old table freed.
    /// </summary>
    private void GrowTable(long neededIndex)
    {
        var start = _next;
        var oldLength = _refTable.Length;
        var clusterSize = _clusterMask + 1;
        long tableClusters = Math.Max(_refTableClusters * 2, 1);
        long blocks = 0;
        while (true)
        {
            var end = start + tableClusters + blocks;
            var entries = Math.Max(neededIndex, (end - 1) >> _blockBits) + 1;
            var newBlocks = entries - oldLength;
            var newClusters = Math.Max(tableClusters, ((entries * 8) + clusterSize - 1) / clusterSize);
            if (newBlocks == blocks && newClusters == tableClusters)
            {
                break;
            }
            blocks = newBlocks;
            tableClusters = newClusters;
        }
        if (tableClusters > (8 << 20) / clusterSize + 1 || tableClusters > int.MaxValue)
        {
            throw new IOException($"{Path}: the refcount table would grow past qemu's 8 MiB bound");
        }
        var table = new ulong[tableClusters * clusterSize / 8];
        _refTable.CopyTo(table, 0);
        var newBlockData = new byte[blocks][];
        for (var j = 0; j < blocks; j++)
        {
            newBlockData[j] = new byte[clusterSize];
            table[oldLength + j] = (ulong)((start + tableClusters + j) << _clusterBits);
        }
        for (var c = start; c < start + tableClusters + blocks; c++)
        {
            var t = c >> _blockBits;
            SetEntry(newBlockData[t - oldLength], (int)(c & ((1L << _blockBits) - 1)), 1);
        }
        for (var j = 0; j < blocks; j++)
        {
            WriteRaw(newBlockData[j], (start + tableClusters + j) << _clusterBits);
        }
        var bytes = new byte[tableClusters * clusterSize];
        for (var i = 0; i < table.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * 8), table[i]);
        }
        var tableOffset = start << _clusterBits;
        WriteRaw(bytes, tableOffset);
        Sync();
        Span<byte> header = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(header, (ulong)tableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(header[8..], (uint)tableClusters);
        WriteRaw(header, 48);
        Sync();
        var oldOffset = _refTableOffset;
        var oldClusters = _refTableClusters;
        _refTable = table;
        _refTableOffset = tableOffset;
        _refTableClusters = tableClusters;
        for (var j = 0; j < blocks; j++)
        {
            _refBlocks[(start + tableClusters + j) << _clusterBits] = newBlockData[j];
        }
        _next = start + tableClusters + blocks;
        for (var c = 0; c < oldClusters; c++)
        {
            AddRef((oldOffset >> _clusterBits) + c, -1);
        }
    }

    private ulong GetEntry(byte[] block, int index)
    {
        switch (_refBits)
        {
            case < 8:
                var bit = index * _refBits;
                return (ulong)(block[bit >> 3] >> (bit & 7)) & _refMax;
            case 8:
                return block[index];
            case 16:
                return BinaryPrimitives.ReadUInt16BigEndian(block.AsSpan(index * 2));
            case 32:
                return BinaryPrimitives.ReadUInt32BigEndian(block.AsSpan(index * 4));
            default:
                return BinaryPrimitives.ReadUInt64BigEndian(block.AsSpan(index * 8));
        }
    }

    /// <summary>Sets a refcount in a block buffer; the bytes that changed (offset, count).</summary>
    private (int At, int Count) SetEntry(byte[] block, int index, ulong value)
    {
        switch (_refBits)
        {
            case < 8:
                var bit = index * _refBits;
                var shift = bit & 7;
                block[bit >> 3] = (byte)((block[bit >> 3] & ~(int)(_refMax << shift)) | (int)(value << shift));
                return (bit >> 3, 1);
            case 8:
                block[index] = (byte)value;
                return (index, 1);
            case 16:
                BinaryPrimitives.WriteUInt16BigEndian(block.AsSpan(index * 2), (ushort)value);
                return (index * 2, 2);
            case 32:
                BinaryPrimitives.WriteUInt32BigEndian(block.AsSpan(index * 4), (uint)value);
                return (index * 4, 4);
            default:
                BinaryPrimitives.WriteUInt64BigEndian(block.AsSpan(index * 8), value);
                return (index * 8, 8);
        }
    }

    /// <summary>pwrite of all of <paramref name="data"/>; grows the file length readers check against.</summary>
    private void WriteRaw(ReadOnlySpan<byte> data, long fileOffset)
    {
        WriteLog?.Write(fileOffset, data);
        RandomAccess.Write(File, data, fileOffset);
        var end = fileOffset + data.Length;
        if (end > FileLength)
        {
            lock (_metadata)
            {
                if (end > FileLength)
                {
                    FileLength = end;
                    _cache.FileLength = end;
                }
            }
        }
    }

    private void Sync()
    {
        WriteLog?.Sync();
        if (Libc.fdatasync((int)File.DangerousGetHandle()) != 0)
        {
            throw new IOException($"{Path}: fdatasync failed (errno {Marshal.GetLastPInvokeError()})");
        }
    }
}
