using System.Buffers.Binary;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;

namespace UblkSharp.Targets.Qcow2;

/// <summary>How a run of guest bytes is stored in one qcow2 image.</summary>
internal enum Qcow2RunKind
{
    /// <summary>In a data cluster (or subcluster) of this image, at a host offset.</summary>
    Data,

    /// <summary>Reads as zeros (the zero flag, or a zero subcluster).</summary>
    Zero,

    /// <summary>Not in this image: the backing file's, or zeros without one.</summary>
    Unallocated,

    /// <summary>Part of one compressed cluster.</summary>
    Compressed,
}

/// <summary>
/// One qcow2 image of a chain, read through its active L1 table or a snapshot's: maps guest
/// offsets to runs of clusters (<see cref="Map"/>) and reads them.
/// <para>
/// Threads: ublk queues call <see cref="Read"/> concurrently. Lookups take <c>_metadata</c>
/// for as long as it takes to find a run (an L2 table from the cache, read from the file on a
/// miss); the data itself is read outside it with pread, which is safe to share. Compressed
/// clusters are decompressed under <c>_compressed</c>, which guards the one scratch buffer, the
/// decompressor and the last decompressed cluster (kept, since a sequential reader asks for it
/// in several requests). Two locks rather than one, so a slow decompression never holds up the
/// lookups of other queues.
/// </para>
/// </summary>
internal sealed partial class Qcow2Image : Qcow2Layer
{
    private const ulong L1OffsetMask = 0x00ff_ffff_ffff_fe00;
    private const ulong L2OffsetMask = 0x00ff_ffff_ffff_fe00;
    private const ulong CompressedBit = 1ul << 62;
    private const ulong ZeroBit = 1;

    private readonly ulong[] _l1;
    private readonly Qcow2L2Cache _cache;
    private readonly Lock _metadata = new();
    private readonly Lock _compressed = new();
    private readonly int _clusterBits;
    private readonly long _clusterMask;
    private readonly int _entrySize;
    private readonly int _l2Mask;
    private readonly bool _extended;
    private readonly int _version;
    private readonly int _subclusterBits;
    private readonly int _csizeShift;
    private readonly ulong _csizeMask;
    private readonly ulong _coffsetMask;
    private Qcow2Decompressor? _decompressor;
    private ulong _cachedEntry;

    public Qcow2Image(string path, SafeFileHandle file, long fileLength, Qcow2Header header, IReadOnlyList<Qcow2Snapshot> snapshots, Qcow2Snapshot? snapshot, long cacheBytes)
        : base(path, file, fileLength)
    {
        Header = header;
        Snapshots = snapshots;
        Snapshot = snapshot;
        _clusterBits = header.ClusterBits;
        _clusterMask = header.ClusterSize - 1;
        _extended = header.ExtendedL2;
        _version = header.Version;
        _entrySize = header.L2EntrySize;
        _l2Mask = header.L2Entries - 1;
        _subclusterBits = _extended ? _clusterBits - 5 : _clusterBits;
        // Compressed descriptors (qcow2.txt): x = 62 - (cluster_bits - 8) bits of host offset, then
        // (cluster_bits - 8) bits of "additional 512-byte sectors".
        _csizeShift = 62 - (_clusterBits - 8);
        _csizeMask = (1ul << (_clusterBits - 8)) - 1;
        _coffsetMask = (1ul << _csizeShift) - 1;
        // qemu reads a virtual size that is not a multiple of 512 as the sectors it holds.
        Size = (snapshot?.DiskSize ?? header.Size) & ~511L;
        var l1Offset = snapshot?.L1TableOffset ?? header.L1TableOffset;
        var l1Size = snapshot?.L1Size ?? header.L1Size;
        // Checked against the file's length and qemu's 32 MiB bound when the header was parsed.
        _l1 = new ulong[l1Size];
        var bytes = new byte[l1Size * 8L];
        if (ReadFile(bytes, l1Offset) < 0)
        {
            throw new IOException($"{path}: cannot read its L1 table");
        }
        for (var i = 0; i < l1Size; i++)
        {
            _l1[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * 8));
        }
        _cache = new Qcow2L2Cache(fileLength, header.ClusterSize, cacheBytes);
    }

    public Qcow2Header Header { get; }

    public IReadOnlyList<Qcow2Snapshot> Snapshots { get; }

    /// <summary>The snapshot served, or null for the active image.</summary>
    public Qcow2Snapshot? Snapshot { get; }

    public override string Format => "qcow2";

    public override long Size { get; }

    public Qcow2L2Cache Cache => _cache;

    public override int Read(Span<byte> buffer, long offset)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var pos = offset + done;
            if (pos >= Size)
            {
                buffer[done..].Clear();
                return 0;
            }
            var max = Math.Min(buffer.Length - done, Size - pos);
            int r;
            Qcow2RunKind kind;
            long host, length;
            ulong entry;
            lock (_metadata)
            {
                r = Map(pos, max, out kind, out host, out length, out entry);
            }
            if (r < 0)
            {
                return r;
            }
            var part = buffer.Slice(done, (int)length);
            switch (kind)
            {
                case Qcow2RunKind.Data:
                    r = ReadFile(part, host);
                    break;
                case Qcow2RunKind.Zero:
                    part.Clear();
                    break;
                case Qcow2RunKind.Unallocated when Backing is not null:
                    r = Backing.Read(part, pos);
                    break;
                case Qcow2RunKind.Unallocated:
                    part.Clear();
                    break;
                default:
                    r = ReadCompressed(part, entry, (int)(pos & _clusterMask));
                    break;
            }
            if (r < 0)
            {
                return r;
            }
            done += (int)length;
        }
        return 0;
    }

    public override long Status(long offset, long length, out AllocationFlags flags)
    {
        flags = AllocationFlags.Hole | AllocationFlags.Zero;
        if (offset >= Size)
        {
            return length;
        }
        int r;
        Qcow2RunKind kind;
        long run;
        lock (_metadata)
        {
            r = Map(offset, Math.Min(length, Size - offset), out kind, out _, out run, out _);
        }
        if (r < 0)
        {
            return r;
        }
        switch (kind)
        {
            case Qcow2RunKind.Data or Qcow2RunKind.Compressed:
                flags = AllocationFlags.None;
                return run;
            case Qcow2RunKind.Zero:
                // No data stored (qemu-img map: "data": false), so a hole that reads as zeros, as
                // qemu-nbd reports it; that the image holds the zero flag (present) has no NBD bit.
                return run;
            default:
                return Backing is null ? run : Backing.Status(offset, run, out flags);
        }
    }

    /// <summary>
    /// The run that starts at guest <paramref name="offset"/> (below <see cref="Size"/>): its kind,
    /// host offset (data), length (1 to <paramref name="maxLength"/>, never past the L2 table that
    /// maps it, nor past one cluster when compressed) and, when compressed, its L2 entry. 0, or
    /// -EIO for a table entry that cannot be right (unaligned, outside the file, contradictory
    /// bitmaps), as qemu fails such a request. Call under <c>_metadata</c>.
    /// </summary>
    internal int Map(long offset, long maxLength, out Qcow2RunKind kind, out long host, out long length, out ulong entry)
    {
        kind = Qcow2RunKind.Unallocated;
        host = 0;
        length = 0;
        entry = 0;
        var bytesPerL1 = Header.BytesPerL1Entry;
        var l1Index = offset / bytesPerL1;
        var limit = Math.Min(maxLength, ((l1Index + 1) * bytesPerL1) - offset);
        if (l1Index >= _l1.Length)
        {
            length = limit;
            return 0;
        }
        var l2Offset = (long)(_l1[l1Index] & L1OffsetMask);
        if (l2Offset == 0)
        {
            length = limit;
            return 0;
        }
        if ((l2Offset & _clusterMask) != 0)
        {
            return -Errno.EIO;
        }
        var r = _cache.Get(File, l2Offset, out var table);
        if (r < 0)
        {
            return r;
        }
        r = Unit(table, offset, out kind, out var hostCluster, out entry);
        if (r < 0)
        {
            return r;
        }
        if (kind == Qcow2RunKind.Compressed)
        {
            length = Math.Min(limit, _clusterMask + 1 - (offset & _clusterMask));
            return 0;
        }
        host = hostCluster + (offset & _clusterMask);
        // Extend over the following units of the same kind (data only while contiguous in the file).
        var end = offset + limit;
        var pos = ((offset >> _subclusterBits) + 1) << _subclusterBits;
        while (pos < end)
        {
            r = Unit(table, pos, out var nextKind, out var nextHost, out _);
            if (r < 0 || nextKind != kind || (kind == Qcow2RunKind.Data && nextHost + (pos & _clusterMask) != host + (pos - offset)))
            {
                break;
            }
            pos += 1L << _subclusterBits;
        }
        length = Math.Min(pos, end) - offset;
        return 0;
    }

    /// <summary>The kind of the cluster, or subcluster with extended L2 entries, holding guest <paramref name="offset"/> (qemu's qcow2_get_subcluster_type).</summary>
    private int Unit(ReadOnlySpan<byte> table, long offset, out Qcow2RunKind kind, out long hostCluster, out ulong entry)
    {
        var index = (int)((offset >> _clusterBits) & _l2Mask);
        entry = Qcow2L2Cache.Entry(table, index, _entrySize);
        hostCluster = (long)(entry & L2OffsetMask);
        kind = Qcow2RunKind.Unallocated;
        if ((entry & CompressedBit) != 0)
        {
            kind = Qcow2RunKind.Compressed;
            return 0;
        }
        if (!_extended)
        {
            if ((entry & ZeroBit) != 0)
            {
                // Version 2 has no zero flag: qemu calls such an entry corrupt, and so do we.
                kind = Qcow2RunKind.Zero;
                return (hostCluster & _clusterMask) != 0 || _version < 3 ? -Errno.EIO : 0;
            }
            if (hostCluster == 0)
            {
                return 0;
            }
            kind = Qcow2RunKind.Data;
            return CheckData(hostCluster);
        }
        var bitmap = Qcow2L2Cache.Bitmap(table, index, _entrySize);
        var sub = (int)((offset >> _subclusterBits) & 31);
        var allocated = (uint)bitmap;
        var zero = (uint)(bitmap >> 32);
        if (hostCluster == 0)
        {
            // No host cluster: no subcluster may claim to be allocated.
            if (allocated != 0)
            {
                return -Errno.EIO;
            }
            kind = (zero & (1u << sub)) != 0 ? Qcow2RunKind.Zero : Qcow2RunKind.Unallocated;
            return 0;
        }
        if ((allocated & zero) != 0)
        {
            return -Errno.EIO;
        }
        if ((zero & (1u << sub)) != 0)
        {
            kind = Qcow2RunKind.Zero;
            return 0;
        }
        if ((allocated & (1u << sub)) != 0)
        {
            kind = Qcow2RunKind.Data;
            return CheckData(hostCluster);
        }
        return 0;
    }

    // A data cluster must be aligned and start inside the file: anything else is a corrupt entry.
    private int CheckData(long hostCluster) => (hostCluster & _clusterMask) != 0 || hostCluster >= FileLength ? -Errno.EIO : 0;

    private int ReadCompressed(Span<byte> part, ulong entry, int inCluster)
    {
        var coffset = (long)(entry & _coffsetMask);
        var sectors = (long)((entry >> _csizeShift) & _csizeMask) + 1;
        var csize = (int)((sectors * 512) - (coffset & 511));
        if (coffset >= FileLength || coffset < 512)
        {
            return -Errno.EIO;
        }
        lock (_compressed)
        {
            var d = _decompressor ??= new Qcow2Decompressor(Header.CompressionType, Header.ClusterSize);
            if (!d.HasCluster || _cachedEntry != entry)
            {
                d.HasCluster = false;
                // The last sectors may run past the end of the file: those read as zeros and are never reached by a good stream.
                var r = ReadFile(d.Input.AsSpan(0, csize), coffset);
                if (r < 0)
                {
                    return r;
                }
                if (!d.Decompress(csize))
                {
                    return -Errno.EIO;
                }
                d.HasCluster = true;
                _cachedEntry = entry;
            }
            d.Output.AsSpan(inCluster, part.Length).CopyTo(part);
        }
        return 0;
    }

    /// <summary>
    /// Counts the clusters of the served L1 table by kind (for `qcow2 info`): reads every L2 table
    /// directly, outside the cache. Extended L2 entries count a cluster as data when any
    /// subcluster is allocated, zero when all are zero, else unallocated.
    /// </summary>
    public (long Data, long Zero, long Compressed, long Unallocated, long Corrupt) CountClusters()
    {
        long data = 0, zeros = 0, compressed = 0, corrupt = 0, seen = 0;
        var clusters = (Size + _clusterMask) >> _clusterBits;
        var table = new byte[_clusterMask + 1];
        var entries = Header.L2Entries;
        for (var i = 0; i < _l1.Length && seen < clusters; i++)
        {
            var inTable = (int)Math.Min(entries, clusters - seen);
            seen += inTable;
            var l2 = (long)(_l1[i] & L1OffsetMask);
            if (l2 == 0)
            {
                continue;
            }
            if ((l2 & _clusterMask) != 0 || l2 >= FileLength || ReadFile(table, l2) < 0)
            {
                corrupt += inTable;
                continue;
            }
            for (var j = 0; j < inTable; j++)
            {
                var e = Qcow2L2Cache.Entry(table, j, _entrySize);
                var bitmap = Qcow2L2Cache.Bitmap(table, j, _entrySize);
                if ((e & CompressedBit) != 0)
                {
                    compressed++;
                }
                else if (_extended ? (uint)(bitmap >> 32) == uint.MaxValue : (e & ZeroBit) != 0)
                {
                    zeros++;
                }
                else if (_extended ? (uint)bitmap != 0 : (e & L2OffsetMask) != 0)
                {
                    data++;
                }
            }
        }
        return (data, zeros, compressed, clusters - data - zeros - compressed - corrupt, corrupt);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _decompressor?.Dispose();
        }
        base.Dispose(disposing);
    }
}
