namespace UblkSharp.Interop.IoUring;

/// <summary>
/// A provided buffer ring (IORING_REGISTER_PBUF_RING, Linux 5.19+): buffers the kernel picks from
/// for requests submitted with <see cref="SqeFlags.BufferSelect"/> and this ring's group id, the id
/// of the buffer used coming back in the CQE's flags. With <see cref="Incremental"/> (IOU_PBUF_RING_INC,
/// Linux 6.12+) a buffer is consumed a piece at a time: each completion takes the next bytes of the
/// same buffer, and <see cref="CqeFlags.BufMore"/> says it has room left. The ring's memory is ours,
/// page-aligned; it is used by the ring's thread only (the tail is published with a release store).
/// </summary>
public sealed unsafe class BufferRing : IDisposable
{
    private readonly Ring _ring;
    private readonly MappedMemory _memory;
    private readonly ProvidedBuffer* _entries;
    private readonly ushort _mask;
    private ushort _tail;
    private bool _registered;

    private readonly ushort _count;

    private BufferRing(Ring ring, ushort groupId, ushort entries, bool incremental)
    {
        _ring = ring;
        _count = entries;
        GroupId = groupId;
        Incremental = incremental;
        _mask = (ushort)(entries - 1);
        _memory = MappedMemory.MapAnonymous((nuint)(entries * sizeof(ProvidedBuffer)), $"io_uring buffer ring {groupId}");
        _entries = (ProvidedBuffer*)_memory.Pointer;
    }

    /// <summary>The buffer group id requests name in <see cref="Sqe.buf_group"/>.</summary>
    public ushort GroupId { get; }

    public bool Incremental { get; }

    /// <summary>Registers a ring of <paramref name="entries"/> (a power of two up to 32768) buffer slots under <paramref name="groupId"/>.</summary>
    public static BufferRing Register(Ring ring, ushort groupId, ushort entries, bool incremental)
    {
        ArgumentNullException.ThrowIfNull(ring);
        if (entries == 0 || entries > 32768 || (entries & (entries - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(entries), $"a buffer ring has a power-of-two number of entries up to 32768, not {entries}");
        }
        var br = new BufferRing(ring, groupId, entries, incremental);
        try
        {
            br.RegisterNow();
            return br;
        }
        catch
        {
            br.Dispose();
            throw;
        }
    }

    private void RegisterNow()
    {
        var reg = new BufReg { ring_addr = (ulong)_entries, ring_entries = _count, bgid = GroupId, flags = (ushort)(Incremental ? IncrementalFlag : 0) };
        _ring.RegisterRaw(RegisterOp.PbufRing, &reg, 1, "IORING_REGISTER_PBUF_RING");
        _registered = true;
    }

    /// <summary>
    /// Empties the ring: unregisters it and registers the same memory again, with head and tail at 0.
    /// For when it is not known how much of the buffers the kernel used (a multishot request that
    /// ended early); allocates nothing. No request may be using the group meanwhile.
    /// </summary>
    public void Reset()
    {
        var reg = new BufReg { bgid = GroupId };
        _ring.RegisterRaw(RegisterOp.UnregisterPbufRing, &reg, 1, "IORING_UNREGISTER_PBUF_RING");
        _registered = false;
        _tail = 0;
        Volatile.Write(ref ((ushort*)_entries)[7], 0);
        RegisterNow();
    }

    /// <summary>IOU_PBUF_RING_INC.</summary>
    internal const ushort IncrementalFlag = 2;

    /// <summary>Puts a buffer in the ring (visible to the kernel once <see cref="Advance"/> publishes it).</summary>
    public void Add(void* buffer, uint length, ushort bufferId, int pending = 0)
    {
        ref var e = ref _entries[(ushort)(_tail + pending) & _mask];
        e.addr = (ulong)buffer;
        e.len = length;
        e.bid = bufferId;
    }

    /// <summary>Publishes the <paramref name="count"/> buffers added since the last call.</summary>
    public void Advance(int count)
    {
        _tail = (ushort)(_tail + count);
        // The tail is entry 0's last 2 bytes (struct io_uring_buf_ring); a release store, so the kernel sees the entries first.
        Volatile.Write(ref ((ushort*)_entries)[7], _tail);
    }

    public void Dispose()
    {
        if (_registered)
        {
            _registered = false;
            var reg = new BufReg { bgid = GroupId };
            try
            {
                _ring.RegisterRaw(RegisterOp.UnregisterPbufRing, &reg, 1, "IORING_UNREGISTER_PBUF_RING");
            }
            catch (Exception e) when (e is ErrnoException or ObjectDisposedException)
            {
                // The ring may be closing; its buffer rings go with it.
            }
        }
        _memory.Dispose();
    }
}
