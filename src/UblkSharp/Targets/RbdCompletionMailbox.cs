using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Targets;

/// <summary>
/// Where librbd hands one queue its finished completions. librbd's image notification is one
/// eventfd per image, so with several queues on one image a queue would wake for, and reap, the
/// others' requests. Instead each completion carries a callback and, as its argument, its tag's
/// record in this queue's mailbox: the callback (on a librbd thread) pushes the tag onto a
/// lock-free list and writes the queue's own eventfd. The queue takes the whole list at once, so
/// pushes never race a pop (no ABA), and a tag is pushed at most once per request it holds.
/// Native memory throughout: the callback reaches it by pointer, with no GC handle per IO.
/// </summary>
internal sealed unsafe class RbdCompletionMailbox : IDisposable
{
    private const int Empty = -1;

    [StructLayout(LayoutKind.Sequential)]
    private struct Box
    {
        public int Head;
        public int EventFd;
        public int* Next;
        public nint* Completions;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct TagRecord
    {
        public Box* Box;
        public int Tag;
    }

    private readonly int _depth;
    private Box* _box;
    private TagRecord* _records;
    private int _taken = Empty; // what the last take left unread (the queue thread's only)

    public RbdCompletionMailbox(int depth)
    {
        _depth = depth;
        var fd = Libc.eventfd(0, Libc.EFD_CLOEXEC);
        if (fd < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), "eventfd");
        }
        _box = (Box*)NativeMemory.AllocZeroed((nuint)sizeof(Box));
        _box->Head = Empty;
        _box->EventFd = fd;
        _box->Next = (int*)NativeMemory.AllocZeroed((nuint)depth, sizeof(int));
        _box->Completions = (nint*)NativeMemory.AllocZeroed((nuint)depth, (nuint)sizeof(nint));
        _records = (TagRecord*)NativeMemory.AllocZeroed((nuint)depth, (nuint)sizeof(TagRecord));
        for (var t = 0; t < depth; t++)
        {
            _records[t].Box = _box;
            _records[t].Tag = t;
        }
    }

    /// <summary>Readable (8 bytes, a count) when completions are waiting.</summary>
    public int EventFd => _box->EventFd;

    public int Depth => _depth;

    /// <summary>A completion for <paramref name="tag"/> that reports here when it finishes.</summary>
    public int CreateCompletion(int tag, out nint completion)
        => Interop.Ceph.RbdAio.rbd_aio_create_completion((nint)(&_records[tag]), (nint)(delegate* unmanaged<nint, nint, void>)&OnComplete, out completion);

    /// <summary>
    /// The next finished completion and its tag, or false when none is waiting. The queue thread's
    /// only; the caller releases the completion.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryTake(out int tag, out nint completion)
    {
        if (_taken == Empty)
        {
            _taken = Interlocked.Exchange(ref _box->Head, Empty);
            if (_taken == Empty)
            {
                tag = 0;
                completion = 0;
                return false;
            }
        }
        tag = _taken;
        completion = Volatile.Read(ref _box->Completions[tag]);
        _taken = _box->Next[tag];
        return true;
    }

    // librbd's rbd_callback_t, on one of librbd's threads.
    [UnmanagedCallersOnly]
    private static void OnComplete(nint completion, nint arg)
    {
        var record = (TagRecord*)arg;
        var box = record->Box;
        var tag = record->Tag;
        Volatile.Write(ref box->Completions[tag], completion);
        int head;
        do
        {
            head = Volatile.Read(ref box->Head);
            box->Next[tag] = head;
        }
        while (Interlocked.CompareExchange(ref box->Head, tag, head) != head);
        ulong one = 1;
        _ = Libc.write(box->EventFd, &one, sizeof(ulong));
    }

    /// <summary>
    /// Only once librbd can call back no more (the image is closed: rbd_close waits for its IO),
    /// which is why the target, not the queue's backend, disposes of mailboxes.
    /// </summary>
    public void Dispose()
    {
        if (_box is null)
        {
            return;
        }
        _ = Libc.close(_box->EventFd);
        NativeMemory.Free(_box->Next);
        NativeMemory.Free(_box->Completions);
        NativeMemory.Free(_box);
        NativeMemory.Free(_records);
        _box = null;
        _records = null;
    }
}
