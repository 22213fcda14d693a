using System.Globalization;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;

namespace UblkSharp.Targets.Qcow2;

/// <summary>
/// A qcow2 image (qemu's format, versions 2 and 3): its active L1 table or an internal snapshot's,
/// over a backing chain of qcow2 and raw images of any depth. Reads of data, zero, unallocated,
/// compressed (zlib or zstd) clusters and extended L2 subclusters; a table entry that cannot be
/// right fails its request with EIO, never the daemon. With <see cref="Qcow2OpenOptions.Writable"/>
/// the top image takes writes, write-zeroes and discards, crash-safe in qemu's order (see
/// <see cref="Qcow2Image"/>'s write half); images with internal snapshots or extended L2 entries
/// are refused for writing. Encryption is not supported.
/// </summary>
public sealed class Qcow2Target : BlockTarget
{
    private readonly Qcow2Image _top;
    private readonly Dictionary<string, string> _recipe;

    /// <summary>Opens an image and its backing chain.</summary>
    /// <exception cref="Qcow2FormatException">An image this reader refuses, with the reason.</exception>
    /// <exception cref="IOException">A file that cannot be opened or read.</exception>
    public Qcow2Target(string path, Qcow2OpenOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        options ??= new Qcow2OpenOptions();
        if (options.CacheSize < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(options), "the L2 cache size cannot be negative");
        }
        var full = System.IO.Path.GetFullPath(path);
        _top = (Qcow2Image)OpenLayer(full, "qcow2", options, top: true, seen: [], depth: 0);
        Size = _top.Size;
        if (options.Writable)
        {
            try
            {
                CheckWritable(_top, options);
                _top.OpenForWrite();
            }
            catch
            {
                _top.Dispose();
                throw;
            }
        }
        _recipe = new Dictionary<string, string> { ["file"] = full };
        if (!options.Writable)
        {
            _recipe["read-only"] = "on";
        }
        if (options.BackingFile is not null)
        {
            _recipe["backing"] = _top.Backing?.Path ?? System.IO.Path.GetFullPath(options.BackingFile);
        }
        if (options.Snapshot is not null)
        {
            _recipe["snapshot"] = options.Snapshot;
        }
        if (options.CacheSize != Qcow2OpenOptions.DefaultCacheSize)
        {
            _recipe["cache-size"] = options.CacheSize.ToString(CultureInfo.InvariantCulture);
        }
    }

    public override long Size { get; }

    public override string Kind => "qcow2";

    public override IReadOnlyDictionary<string, string> Recipe => _recipe;

    public override bool IsReadOnly => !_top.Writable;

    public override bool HasVolatileCache => _top.Writable;

    public override bool CanDiscard => _top.Writable;

    // Nothing lives in the daemon's memory but caches: a rebuilt target reads the same image. A
    // write completes only after its data and every metadata change it needs were pwritten to the
    // image in a safe order (refcounts and data before the entries that use them), so the page
    // cache holds a consistent image at every completion: a daemon crash loses nothing completed,
    // and at worst leaks the clusters of a write in flight.
    public override bool SurvivesRestart => true;

    public string Path => _top.Path;

    /// <summary>Test hook: sees every write and sync made to the top image, in order.</summary>
    internal IQcow2WriteLog? WriteLog
    {
        get => _top.WriteLog;
        set => _top.WriteLog = value;
    }

    public Qcow2Header Header => _top.Header;

    public IReadOnlyList<Qcow2Snapshot> Snapshots => _top.Snapshots;

    /// <summary>The snapshot served, or null for the active image.</summary>
    public Qcow2Snapshot? Snapshot => _top.Snapshot;

    /// <summary>Every image of the chain from this one down: path, format ("qcow2", "raw") and size.</summary>
    public IReadOnlyList<(string Path, string Format, long Size)> Chain
    {
        get
        {
            var list = new List<(string, string, long)>();
            for (Qcow2Layer? l = _top; l is not null; l = l.Backing)
            {
                list.Add((l.Path, l.Format, l.Size));
            }
            return list;
        }
    }

    /// <summary>The clusters of the served table by kind; see <see cref="Qcow2Image.CountClusters"/>.</summary>
    public (long Data, long Zero, long Compressed, long Unallocated, long Corrupt) CountClusters() => _top.CountClusters();

    /// <summary>The L2 cache's hits and misses so far (the top image's), and its slots.</summary>
    public (long Hits, long Misses, int Slots) CacheStats => (_top.Cache.Hits, _top.Cache.Misses, _top.Cache.Slots);

    public override int Read(Span<byte> buffer, long offset)
    {
        if (offset < 0 || offset > Size - buffer.Length)
        {
            return -Errno.EINVAL;
        }
        try
        {
            var r = _top.Read(buffer, offset);
            return r < 0 ? r : buffer.Length;
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            // A file that went away or a stream the decompressor rejects: this request fails, not the device.
            return -Errno.EIO;
        }
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        if (!_top.Writable)
        {
            return -Errno.EROFS;
        }
        if (offset < 0 || offset > Size - data.Length)
        {
            return -Errno.EINVAL;
        }
        try
        {
            var r = _top.Write(data, offset);
            return r < 0 ? r : data.Length;
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            return -Errno.EIO;
        }
    }

    public override int Flush() => _top.Writable ? _top.Flush() : 0;

    public override int WriteZeroes(long offset, long length, bool mayUnmap) => Zero(offset, length);

    // Discarded ranges read as zeros afterwards (the zero flag over a backing file, else deallocated).
    public override int Discard(long offset, long length) => Zero(offset, length);

    private int Zero(long offset, long length)
    {
        if (!_top.Writable)
        {
            return -Errno.EROFS;
        }
        if (offset < 0 || length < 0 || offset > Size - length)
        {
            return -Errno.EINVAL;
        }
        try
        {
            return _top.Zero(offset, length);
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            return -Errno.EIO;
        }
    }

    private static void CheckWritable(Qcow2Image image, Qcow2OpenOptions options)
    {
        var h = image.Header;
        var path = image.Path;
        if (options.Snapshot is not null)
        {
            throw new Qcow2FormatException($"{path}: an internal snapshot is served read-only; drop --snapshot to write the active image, or open read-only");
        }
        if ((h.IncompatibleFeatures & Qcow2Header.CorruptBit) != 0)
        {
            throw new Qcow2FormatException($"{path} is marked corrupt (incompatible feature bit 1): it can only be opened read-only; check it with qemu-img check");
        }
        if ((h.IncompatibleFeatures & Qcow2Header.DirtyBit) != 0)
        {
            throw new Qcow2FormatException($"{path} is dirty (its refcounts may be stale after a crash with lazy refcounts): repair it with `qemu-img check -r all {path}` before writing, or open it read-only");
        }
        if (h.ExtendedL2)
        {
            throw new Qcow2FormatException($"{path} has extended L2 entries (subclusters), which this version writes not: open it read-only");
        }
        if ((h.AutoclearFeatures & 1) != 0)
        {
            throw new Qcow2FormatException($"{path} has persistent dirty bitmaps, which this version does not update (writing would invalidate them): open it read-only, or remove them first (qemu-img bitmap --remove)");
        }
        if (h.SnapshotCount > 0)
        {
            throw new Qcow2FormatException($"{path} has {h.SnapshotCount} internal snapshot(s), whose shared clusters this version does not copy on write: open it read-only, or delete the snapshots (qemu-img snapshot -d)");
        }
    }

    public override long GetAllocation(long offset, long length, out AllocationFlags flags)
    {
        flags = AllocationFlags.None;
        if (offset < 0 || length <= 0 || offset >= Size)
        {
            return -Errno.EINVAL;
        }
        try
        {
            return _top.Status(offset, Math.Min(length, Size - offset), out flags);
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            return -Errno.EIO;
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            if (_top.Writable)
            {
                _top.Flush();
            }
            _top.Dispose();
        }
        base.Dispose(disposing);
    }

    /// <summary>
    /// Makes a new, empty qcow2 version 3 image as `qemu-img create -f qcow2` lays it out: the
    /// header (with the backing format extension and name when <paramref name="backing"/> is
    /// given, written as given: a relative name is relative to the image's directory), one cluster
    /// of refcount table, one refcount block (16-bit) and the L1 table, all counted. Refuses an
    /// existing file. <paramref name="size"/>: the virtual size, a multiple of 512 bytes.
    /// </summary>
    public static void Create(string path, long size, string? backing = null, int clusterBits = 16)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (size <= 0 || size % 512 != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size), "the virtual size must be a positive multiple of 512 bytes");
        }
        if (clusterBits is < Qcow2Header.MinClusterBits or > Qcow2Header.MaxClusterBits)
        {
            throw new ArgumentOutOfRangeException(nameof(clusterBits), "cluster_bits must be 9 to 21");
        }
        var clusterSize = 1 << clusterBits;
        var perL1 = (long)(clusterSize / 8) << clusterBits;
        var l1Size = (size + perL1 - 1) / perL1;
        var l1Clusters = ((l1Size * 8) + clusterSize - 1) / clusterSize;
        var clusters = 3 + l1Clusters;
        if (l1Size > Qcow2Header.MaxL1Entries || clusters > (long)clusterSize * 8 / 16)
        {
            throw new ArgumentOutOfRangeException(nameof(size), "too large a virtual size for this cluster size");
        }
        string? backingFormat = null;
        if (backing is not null)
        {
            var full = System.IO.Path.IsPathRooted(backing) ? backing : System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!, backing);
            using var b = System.IO.File.OpenHandle(full, FileMode.Open, FileAccess.Read);
            Span<byte> magic = stackalloc byte[4];
            backingFormat = RandomAccess.Read(b, magic, 0) == 4 && Qcow2Header.HasMagic(magic) ? "qcow2" : "raw";
        }
        var image = new byte[clusters * clusterSize];
        var h = image.AsSpan();
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h, Qcow2Header.Magic);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[4..], 3);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[20..], (uint)clusterBits);
        System.Buffers.Binary.BinaryPrimitives.WriteInt64BigEndian(h[24..], size);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[36..], (uint)l1Size);
        System.Buffers.Binary.BinaryPrimitives.WriteInt64BigEndian(h[40..], 3L * clusterSize);
        System.Buffers.Binary.BinaryPrimitives.WriteInt64BigEndian(h[48..], 1L * clusterSize);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[56..], 1);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[96..], 4);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[100..], 104);
        var at = 104;
        if (backing is not null)
        {
            var fmt = System.Text.Encoding.ASCII.GetBytes(backingFormat!);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[at..], 0xe2792aca);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[(at + 4)..], (uint)fmt.Length);
            fmt.CopyTo(h[(at + 8)..]);
            at += 8 + ((fmt.Length + 7) & ~7);
        }
        at += 8; // The end-of-extensions marker: type 0, length 0.
        if (backing is not null)
        {
            var name = System.Text.Encoding.UTF8.GetBytes(backing);
            if (name.Length > 1023 || at + name.Length > clusterSize)
            {
                throw new ArgumentException($"the backing file name '{backing}' is too long (at most 1023 bytes)", nameof(backing));
            }
            System.Buffers.Binary.BinaryPrimitives.WriteInt64BigEndian(h[8..], at);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(h[16..], (uint)name.Length);
            name.CopyTo(h[at..]);
        }
        // The refcount table's one block at cluster 2, counting clusters 0 .. 3 + L1.
        System.Buffers.Binary.BinaryPrimitives.WriteInt64BigEndian(h[clusterSize..], 2L * clusterSize);
        for (var c = 0; c < clusters; c++)
        {
            System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(h[((2 * clusterSize) + (c * 2))..], 1);
        }
        using var file = System.IO.File.OpenHandle(path, FileMode.CreateNew, FileAccess.Write);
        RandomAccess.Write(file, image, 0);
        RandomAccess.FlushToDisk(file);
    }

    /// <summary>
    /// Opens <paramref name="path"/> as <paramref name="format"/> (null: probe by magic) and the
    /// chain below it. Relative backing names are relative to the directory of the image that
    /// names them, as qemu resolves them.
    /// </summary>
    private static Qcow2Layer OpenLayer(string path, string? format, Qcow2OpenOptions options, bool top, HashSet<string> seen, int depth)
    {
        if (depth >= Qcow2OpenOptions.MaxChainDepth)
        {
            throw new Qcow2FormatException($"{path}: the backing chain is deeper than {Qcow2OpenOptions.MaxChainDepth} images");
        }
        if (!seen.Add(path))
        {
            throw new Qcow2FormatException($"{path}: the backing chain loops (this image is its own backing file)");
        }
        if (Directory.Exists(path))
        {
            throw new IOException($"{path} is a directory, not an image");
        }
        if (!System.IO.File.Exists(path))
        {
            throw new FileNotFoundException($"{path}: no such {(top ? "image" : "backing file")}", path);
        }
        var file = System.IO.File.OpenHandle(path, FileMode.Open, top && options.Writable ? FileAccess.ReadWrite : FileAccess.Read, FileShare.ReadWrite);
        Qcow2Layer? layer = null;
        try
        {
            var length = RandomAccess.GetLength(file);
            var start = ReadStart(file, length);
            if (format is null)
            {
                format = Qcow2Header.HasMagic(start) ? "qcow2" : "raw";
            }
            if (format == "raw")
            {
                return new RawLayer(path, file, length);
            }
            if (format != "qcow2")
            {
                throw new Qcow2FormatException($"{path}: backing format '{format}' is not supported (qcow2 and raw are)");
            }
            var header = Qcow2Header.Parse(start, length, path);
            var snapshots = top && header.SnapshotCount > 0 ? Qcow2Snapshot.ReadTable(file, header, length, path) : [];
            Qcow2Snapshot? snapshot = null;
            if (top && options.Snapshot is { } wanted)
            {
                snapshot = Qcow2Snapshot.Find(snapshots, wanted)
                    ?? throw new Qcow2FormatException(snapshots.Count == 0
                        ? $"{path} has no snapshot '{wanted}' (it has no snapshots)"
                        : $"{path} has no snapshot '{wanted}' (it has: {string.Join(", ", snapshots.Select(s => $"{s.Id} '{s.Name}'"))})");
            }
            var image = new Qcow2Image(path, file, length, header, snapshots, snapshot, options.CacheSize);
            layer = image;
            string? backingPath = null;
            string? backingFormat = null;
            if (top && options.BackingFile is not null)
            {
                backingPath = System.IO.Path.GetFullPath(options.BackingFile);
            }
            else if (header.BackingFile is { } named)
            {
                backingPath = Resolve(path, named);
                backingFormat = header.BackingFormat;
            }
            if (backingPath is not null)
            {
                image.Backing = OpenLayer(backingPath, backingFormat, options, top: false, seen, depth + 1);
            }
            return image;
        }
        catch
        {
            if (layer is not null)
            {
                layer.Dispose();
            }
            else
            {
                file.Dispose();
            }
            throw;
        }
    }

    private static string Resolve(string image, string backing)
    {
        // qemu treats "proto:..." before any '/' as a protocol (nbd:, json:, http:...): not a file here.
        var colon = backing.IndexOf(':', StringComparison.Ordinal);
        var slash = backing.IndexOf('/', StringComparison.Ordinal);
        if (colon > 0 && (slash < 0 || colon < slash))
        {
            throw new Qcow2FormatException($"{image}: its backing file '{backing}' is not a plain file name (protocols such as nbd: or json: are not supported); give one with --backing");
        }
        return System.IO.Path.IsPathRooted(backing)
            ? backing
            : System.IO.Path.GetFullPath(System.IO.Path.Combine(System.IO.Path.GetDirectoryName(image)!, backing));
    }

    /// <summary>The start of a file: its first cluster when it is qcow2 (the header and its extensions), else 4 KiB.</summary>
    private static byte[] ReadStart(SafeFileHandle file, long length)
    {
        var probe = new byte[(int)Math.Min(length, 4096)];
        ReadAll(file, probe);
        var want = probe.Length;
        if (Qcow2Header.HasMagic(probe) && probe.Length >= 24)
        {
            var bits = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(probe.AsSpan(20));
            if (bits is >= Qcow2Header.MinClusterBits and <= Qcow2Header.MaxClusterBits)
            {
                want = (int)Math.Min(length, 1L << (int)bits);
            }
        }
        if (want <= probe.Length)
        {
            return probe;
        }
        var start = new byte[want];
        ReadAll(file, start);
        return start;
    }

    private static void ReadAll(SafeFileHandle file, byte[] buffer)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var n = RandomAccess.Read(file, buffer.AsSpan(done), done);
            if (n <= 0)
            {
                Array.Clear(buffer, done, buffer.Length - done);
                return;
            }
            done += n;
        }
    }
}
