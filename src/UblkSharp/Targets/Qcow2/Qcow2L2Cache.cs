using System.Buffers.Binary;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;

namespace UblkSharp.Targets.Qcow2;

/// <summary>
/// A bounded cache of one image's L2 tables: a fixed number of slots, each a cluster-sized buffer
/// allocated once, evicted least recently used. A hit costs a dictionary lookup and nothing is
/// allocated in steady state (the dictionary is sized for every slot up front, so adding and
/// removing keys reuses its entries).
/// <para>
/// Not thread-safe: the image that owns it calls it under its own lock (see
/// <see cref="Qcow2Image"/>), and the returned span is valid only until the next call.
/// </para>
/// </summary>
internal sealed class Qcow2L2Cache
{
    private long _fileLength;
    private readonly int _clusterSize;
    private readonly byte[][] _tables;
    private readonly long[] _keys;
    private readonly long[] _lastUse;
    private readonly Dictionary<long, int> _index;
    private long _clock;

    /// <param name="fileLength">The image file's length: a table that starts past it is corrupt.</param>
    /// <param name="clusterSize">Bytes of one table.</param>
    /// <param name="cacheBytes">Bytes of tables to keep; at least one table is always kept.</param>
    public Qcow2L2Cache(long fileLength, int clusterSize, long cacheBytes)
    {
        _fileLength = fileLength;
        _clusterSize = clusterSize;
        // Bounded above too: a huge --cache-size must not pin more than 4096 tables' worth of slots.
        var slots = (int)Math.Clamp(cacheBytes / clusterSize, 1, 4096);
        _tables = new byte[slots][];
        _keys = new long[slots];
        _lastUse = new long[slots];
        for (var i = 0; i < slots; i++)
        {
            _tables[i] = new byte[clusterSize];
            _keys[i] = -1;
        }
        _index = new Dictionary<long, int>(slots);
    }

    public int Slots => _tables.Length;

    /// <summary>The image file's length, raised as a writer appends clusters.</summary>
    public long FileLength
    {
        get => _fileLength;
        set => _fileLength = value;
    }

    /// <summary>Patches one 8-byte entry of the table at <paramref name="offset"/> if it is cached (a writer's update).</summary>
    public void Patch(long offset, int index, int entrySize, ulong entry)
    {
        if (_index.TryGetValue(offset, out var slot))
        {
            BinaryPrimitives.WriteUInt64BigEndian(_tables[slot].AsSpan(index * entrySize), entry);
        }
    }

    public long Hits { get; private set; }

    public long Misses { get; private set; }

    /// <summary>
    /// The L2 table at <paramref name="offset"/> (cluster-aligned, checked by the caller), read from
    /// <paramref name="file"/> (its image's, which owns it) on a miss; 0 or a negative errno: -EIO
    /// when the table starts outside the file or cannot be read.
    /// </summary>
    public int Get(SafeFileHandle file, long offset, out ReadOnlySpan<byte> table)
    {
        table = default;
        if (offset <= 0 || offset >= _fileLength)
        {
            return -Errno.EIO;
        }
        _clock++;
        if (_index.TryGetValue(offset, out var slot))
        {
            Hits++;
            _lastUse[slot] = _clock;
            table = _tables[slot];
            return 0;
        }
        Misses++;
        slot = Victim();
        if (_keys[slot] >= 0)
        {
            _index.Remove(_keys[slot]);
            _keys[slot] = -1;
        }
        var r = ReadTable(file, _tables[slot], offset);
        if (r < 0)
        {
            return r;
        }
        _keys[slot] = offset;
        _lastUse[slot] = _clock;
        _index[offset] = slot;
        table = _tables[slot];
        return 0;
    }

    /// <summary>One L2 entry's first 64 bits, and with extended entries its bitmap.</summary>
    public static ulong Entry(ReadOnlySpan<byte> table, int index, int entrySize)
        => BinaryPrimitives.ReadUInt64BigEndian(table[(index * entrySize)..]);

    public static ulong Bitmap(ReadOnlySpan<byte> table, int index, int entrySize)
        => entrySize == 16 ? BinaryPrimitives.ReadUInt64BigEndian(table[((index * entrySize) + 8)..]) : 0;

    // Linear in the slots: a miss reads a whole cluster from the file, which costs far more.
    private int Victim()
    {
        var victim = 0;
        for (var i = 0; i < _keys.Length; i++)
        {
            if (_keys[i] < 0)
            {
                return i;
            }
            if (_lastUse[i] < _lastUse[victim])
            {
                victim = i;
            }
        }
        return victim;
    }

    private static int ReadTable(SafeFileHandle file, byte[] buffer, long offset)
    {
        try
        {
            var done = 0;
            while (done < buffer.Length)
            {
                var n = RandomAccess.Read(file, buffer.AsSpan(done), offset + done);
                if (n <= 0)
                {
                    // A table cut short by the end of the file reads as zeros there, as qemu's file driver reads.
                    buffer.AsSpan(done).Clear();
                    break;
                }
                done += n;
            }
            return 0;
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }
}
