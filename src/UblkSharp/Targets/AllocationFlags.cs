namespace UblkSharp.Targets;

/// <summary>
/// How a run of a target is stored, as <see cref="BlockTarget.GetAllocation"/> reports it. The
/// values are NBD's base:allocation flags, so an NBD export sends them as they are.
/// </summary>
[Flags]
public enum AllocationFlags
{
    /// <summary>Allocated, or not known: the data must be read.</summary>
    None = 0,

    /// <summary>Not allocated in the backing store (writing it may need space).</summary>
    Hole = 1,

    /// <summary>Reads as zeros.</summary>
    Zero = 2,
}
