namespace UblkSharp.Targets;

/// <summary>
/// A target that wraps another, as nbdkit's filters wrap a plugin: everything it does not override
/// goes to <see cref="Inner"/>, capabilities included, and they are answered by the inner target
/// rather than guessed from which methods this class overrides. Override what the layer changes;
/// to change results that come back through the queue's io_uring too, override
/// <see cref="CreateResultFilter"/> (chaining the inner target's filter). Nothing in the runtime
/// or the NBD server knows a wrapper by its type.
/// </summary>
public abstract class WrapperTarget : BlockTarget
{
    private readonly bool _ownsInner;

    /// <param name="inner">The wrapped target.</param>
    /// <param name="ownsInner">Whether disposing the wrapper disposes <paramref name="inner"/>.</param>
    protected WrapperTarget(BlockTarget inner, bool ownsInner = true)
    {
        ArgumentNullException.ThrowIfNull(inner);
        Inner = inner;
        _ownsInner = ownsInner;
    }

    public BlockTarget Inner { get; }

    public override long Size => Inner.Size;

    public override bool CanResize => Inner.CanResize;

    public override void Resize(long newSize, bool growBacking) => Inner.Resize(newSize, growBacking);

    public override string Kind => Inner.Kind;

    public override IReadOnlyDictionary<string, string> Recipe => Inner.Recipe;

    public override int LogicalBlockSize => Inner.LogicalBlockSize;

    public override int PhysicalBlockSize => Inner.PhysicalBlockSize;

    public override bool IsReadOnly => Inner.IsReadOnly;

    public override bool HasVolatileCache => Inner.HasVolatileCache;

    public override bool CanDiscard => Inner.CanDiscard;

    public override bool CanWriteZeroes => Inner.CanWriteZeroes;

    public override bool CanFastZero => Inner.CanFastZero;

    public override bool HasNativeFua => Inner.HasNativeFua;

    public override bool IsRotational => Inner.IsRotational;

    public override bool SurvivesRestart => Inner.SurvivesRestart;

    public override bool SurvivesHandOver => Inner.SurvivesHandOver;

    public override int Read(Span<byte> buffer, long offset) => Inner.Read(buffer, offset);

    public override int Write(ReadOnlySpan<byte> data, long offset) => Inner.Write(data, offset);

    public override int WriteFua(ReadOnlySpan<byte> data, long offset) => Inner.WriteFua(data, offset);

    public override int Flush() => Inner.Flush();

    public override int Discard(long offset, long length) => Inner.Discard(offset, length);

    public override int WriteZeroes(long offset, long length, bool mayUnmap) => Inner.WriteZeroes(offset, length, mayUnmap);

    public override long GetAllocation(long offset, long length, out AllocationFlags flags) => Inner.GetAllocation(offset, length, out flags);

    public override int Cache(long offset, long length) => Inner.Cache(offset, length);

    public override UringBackend? CreateUringBackend(int queueId) => Inner.CreateUringBackend(queueId);

    public override ResultFilter? CreateResultFilter(int streamId) => Inner.CreateResultFilter(streamId);

    protected override void Dispose(bool disposing)
    {
        if (disposing && _ownsInner)
        {
            Inner.Dispose();
        }
        base.Dispose(disposing);
    }
}
